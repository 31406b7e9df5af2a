"""Admission at arrival: the policy, the drain rate, Retry-After, client deadlines, 429."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import orjson
import pytest

from app.admission import (
    CONCURRENCY,
    DEADLINE_UNMEETABLE,
    QUEUE_FULL,
    Admission,
    DrainRate,
    admission_refusal,
    client_timeout_s,
    retry_after_s,
)
from app.batching import MicroBatcher
from app.errors import DeadlineExceeded, InvalidParameter, NotReady, Overloaded
from app.settings import Settings
from tests.conftest import running_app
from tests.images import png

PNG = {"content-type": "image/png"}


def refusal(**overrides) -> str | None:
    state = dict(
        items=1,
        queued=0,
        capacity=10,
        in_progress=1,
        max_concurrency=0,
        rate=100.0,
        time_left_s=1.0,
    )
    return admission_refusal(**{**state, **overrides})


def test_policy_names_the_limit_that_was_hit():
    assert refusal() is None
    assert refusal(queued=9) is None  # exactly fills the queue
    assert refusal(queued=10) == QUEUE_FULL
    assert refusal(items=4, queued=7) == QUEUE_FULL
    assert refusal(in_progress=5, max_concurrency=4) == CONCURRENCY
    assert refusal(in_progress=4, max_concurrency=4) is None
    # 50 ahead at 100/s need 0.5 s: a 0.4 s deadline cannot be met, a 0.6 s one can
    assert refusal(queued=49, capacity=100, time_left_s=0.4) == DEADLINE_UNMEETABLE
    assert refusal(queued=49, capacity=100, time_left_s=0.6) is None
    assert refusal(queued=49, capacity=100, time_left_s=0.4, rate=None) is None  # none measured


def test_retry_after_grows_with_the_queue_and_shrinks_with_the_drain_rate():
    assert retry_after_s(0, None) == 1
    assert retry_after_s(100, 1000.0) == 1  # never below one second
    assert retry_after_s(1500, 1000.0) == 2
    assert retry_after_s(3000, 1000.0) == 3
    assert retry_after_s(3000, 500.0) == 6
    assert retry_after_s(10**9, 1.0) == 60  # capped


def test_drain_rate_is_a_weighted_mean_that_ignores_idle_gaps():
    rate = DrainRate(smoothing=0.5)
    assert rate.per_second is None
    rate.completed(10, dispatched_at=0.0, now=0.1)
    assert rate.per_second == pytest.approx(100)
    # dispatched long after the last completion: the idle gap does not count
    rate.completed(10, dispatched_at=5.0, now=5.1)
    assert rate.per_second == pytest.approx(100)
    # back to back: counted from the previous completion, 30 items in 0.1 s
    rate.completed(30, dispatched_at=5.05, now=5.2)
    assert rate.per_second == pytest.approx((0.5 * 10 + 0.5 * 30) / 0.1)


def test_client_deadline_header_is_capped_by_the_server():
    assert client_timeout_s({}, 5.0) == 5.0
    assert client_timeout_s({b"x-request-timeout-ms": b"250"}, 5.0) == 0.25
    assert client_timeout_s({b"x-request-timeout-ms": b"0.5"}, 5.0) == 0.0005
    assert client_timeout_s({b"x-request-timeout-ms": b"60000"}, 5.0) == 5.0
    for bad in (b"", b"soon", b"0", b"-5", b"nan", b"inf"):
        with pytest.raises(InvalidParameter):
            client_timeout_s({b"x-request-timeout-ms": bad}, 5.0)


def held_batcher(capacity: int) -> tuple[MicroBatcher, threading.Event]:
    """A real batcher whose engine blocks until released: what is submitted stays queued."""
    release = threading.Event()

    def run(inputs: np.ndarray) -> np.ndarray:
        release.wait(10)
        return inputs

    return MicroBatcher(run, max_batch_size=1, queue_capacity=capacity), release


async def test_retry_after_follows_the_real_queue_and_drain_rate():
    batcher, release = held_batcher(capacity=50)
    admission = Admission(batcher, lambda: 1, capacity=50, max_concurrency=0, hold_max_s=1.0)
    admission.ready = True
    batcher.drain_rate.completed(10, dispatched_at=0.0, now=1.0)  # 10 requests a second
    deadline = time.monotonic() + 30
    try:
        pendings = [batcher.submit(np.zeros((1, 1)), deadline) for _ in range(31)]
        await asyncio.sleep(0)  # the first has gone to the engine; 30 wait
        assert batcher.queue_depth == 30
        admission.check(1, 30.0)  # 3.1 s of queue fits a 30 s deadline
        with pytest.raises(Overloaded) as refused:
            admission.check(1, 2.0)
        assert refused.value.reason == DEADLINE_UNMEETABLE
        assert refused.value.headers["retry-after"] == "3"  # 30 waiting at 10/s
        assert refused.value.hold_s == 1.0  # 3 s of drain, held at most 1 s
        pendings += [batcher.submit(np.zeros((1, 1)), deadline) for _ in range(20)]
        with pytest.raises(Overloaded) as refused:
            admission.check(1, 30.0)
        assert refused.value.reason == QUEUE_FULL
        assert refused.value.headers["retry-after"] == "5"  # 50 waiting at 10/s
    finally:
        release.set()
        for pending in pendings:
            await batcher.wait(pending)
        await batcher.drain()


def test_refusals_before_any_queue_check():
    batcher, _ = held_batcher(capacity=5)
    admission = Admission(batcher, lambda: 1, capacity=5, max_concurrency=0, hold_max_s=0)
    with pytest.raises(NotReady):
        admission.check(1, 1.0)
    admission.ready = True
    with pytest.raises(DeadlineExceeded):
        admission.check(1, 0.0)
    admission.check(1, 1.0)


def slow_drain() -> DrainRate:
    """A measured rate of 0.1 requests a second."""
    rate = DrainRate()
    rate.completed(1, dispatched_at=0.0, now=10.0)
    return rate


def error_of(response) -> dict:
    return orjson.loads(response.content)["error"]


async def test_unmeetable_client_deadline_is_refused_at_arrival(bundle_dir):
    async with running_app(Settings(model=bundle_dir, threads=1)) as client:
        service = client.app.state.registry.default.current
        assert (await client.post("/classify", content=png(), headers=PNG)).status_code == 200
        service.batcher.drain_rate = slow_drain()
        # one request takes 10 s at that rate: a 50 ms deadline cannot be met, 5 s neither
        for timeout in ("50", "5000"):
            headers = {**PNG, "x-request-timeout-ms": timeout}
            refused = await client.post("/classify", content=png(), headers=headers)
            assert refused.status_code == 503
            assert error_of(refused)["reason"] == DEADLINE_UNMEETABLE
            assert refused.headers["retry-after"] == "1"  # nothing is queued
        v2 = await client.post(
            "/v2/models/tiny/infer", content=b"{}", headers={"x-request-timeout-ms": "50"}
        )
        assert v2.status_code == 503
        assert "deadline" in orjson.loads(v2.content)["error"]
        bad = await client.post("/classify", content=png(), headers={"x-request-timeout-ms": "x"})
        assert bad.status_code == 422
        metrics = (await client.get("/metrics")).text
    assert 'blink_rejections_total{model="tiny",reason="deadline_unmeetable"} 3.0' in metrics


async def test_overload_status_can_be_429(bundle_dir):
    settings = Settings(model=bundle_dir, threads=1, overload_status=429)
    async with running_app(settings) as client:
        client.app.state.registry.default.current.batcher.drain_rate = slow_drain()
        refused = await client.post(
            "/classify", content=png(), headers={**PNG, "x-request-timeout-ms": "50"}
        )
        v2 = await client.post(
            "/v2/models/tiny/infer", content=b"{}", headers={"x-request-timeout-ms": "50"}
        )
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 429 and v2.status_code == 429
    assert refused.headers["retry-after"] == "1" and v2.headers["retry-after"] == "1"
    assert 'blink_requests_total{model="tiny",route="/classify",status="429"} 1.0' in metrics


async def test_concurrency_limit_refuses_the_request_over_it(bundle_dir):
    settings = Settings(model=bundle_dir, threads=1, max_concurrency=1)
    async with running_app(settings) as client:
        app = client.app
        body_sent, never = asyncio.Event(), asyncio.Event()
        bodies = [{"type": "http.request", "body": png(), "more_body": False}]

        async def slow_receive() -> dict:  # the body comes late; no disconnect ever comes
            await body_sent.wait()
            if not bodies:
                await never.wait()
            return bodies.pop()

        answers: list[dict] = []

        async def send(message: dict) -> None:
            answers.append(message)

        first = asyncio.ensure_future(app(scope(), slow_receive, send))
        await asyncio.sleep(0.01)
        refused = await client.post("/classify", content=png(), headers=PNG)
        body_sent.set()
        await first
    assert refused.status_code == 503
    assert error_of(refused)["reason"] == CONCURRENCY
    assert answers[0]["status"] == 200


def scope(path: str = "/classify", headers: list | None = None) -> dict:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": headers or [(b"content-type", b"image/png")],
        "root_path": "",
    }


def test_retry_after_is_whole_seconds():
    for queued, rate in ((1, 3.0), (7, 2.0), (999, 1000.0)):
        assert retry_after_s(queued, rate) == max(1, math.ceil(queued / rate))
