"""Every request is counted as what happened to it: one outcome mapping for /classify and V2."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from app.batching import ClientGone
from app.errors import (
    BadImage,
    DeadlineExceeded,
    InvalidParameter,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from app.outcomes import CLIENT_CLOSED, outcome_of
from app.settings import Settings
from app.v2.errors import V2Error
from tests.conftest import live_server, running_app
from tests.images import png
from tests.metrics_text import parse, scrape, value
from tests.test_v2_errors import image_request

PNG = {"content-type": "image/png"}


@pytest.mark.parametrize(
    ("exc", "status", "reason", "answered"),
    [
        (Overloaded.because("queue_full", 3), 503, "queue_full", True),
        (Overloaded.because("concurrency", 1), 503, "concurrency", True),
        (Overloaded.because("deadline_unmeetable", 2), 503, "deadline_unmeetable", True),
        (NotReady("warming up"), 503, "not_ready", True),
        (DeadlineExceeded("late"), 504, "deadline", True),
        (ClientGone(), CLIENT_CLOSED, "disconnected", False),
        (asyncio.CancelledError(), CLIENT_CLOSED, "cancelled", False),
        (BadImage("x"), 400, None, True),
        (PayloadTooLarge("x"), 413, None, True),
        (InvalidParameter("x"), 422, None, True),
        (V2Error(404, "no such model"), 404, None, True),
        (ZeroDivisionError(), 500, None, True),
    ],
)
def test_one_mapping_from_outcome_to_status_and_reason(exc, status, reason, answered):
    outcome = outcome_of(exc)
    assert (outcome.status, outcome.reason, outcome.answered) == (status, reason, answered)


def test_overload_status_setting_applies_to_overload_only():
    assert outcome_of(Overloaded.because("queue_full", 1), 429).status == 429
    assert outcome_of(NotReady("warming up"), 429).status == 503


async def cancel_mid_inference(client, request) -> None:
    """Start `request`, wait until its batch runs on the engine, then cancel it."""
    service = client.app.state.registry.default.current
    task = asyncio.ensure_future(request)
    for _ in range(2000):
        await asyncio.sleep(0.001)
        if service.active_requests and service.batcher._running:
            break
    else:
        pytest.fail("the request never reached the engine")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("route", ["/classify", "/v2/models/{name}/infer"])
async def test_a_cancelled_request_is_not_counted_as_answered(slow_bundle_dir, route):
    """Cancelled while its batch runs (as a server's shutdown timeout does): 499, not 200."""
    settings = Settings(model=slow_bundle_dir, threads=1, max_batch_size=1, inline_max_ms=0)
    async with running_app(settings) as client:
        if route == "/classify":
            request = client.post("/classify", content=png(), headers=PNG)
        else:
            request = client.post("/v2/models/tiny/infer", **image_request(png()))
        await cancel_mid_inference(client, request)
        samples = parse((await client.get("/metrics")).text)
        assert client.app.state.registry.default.current.active_requests == 0
    assert value(samples, "blink_requests_total", route=route, status="200") == 0
    assert value(samples, "blink_requests_total", route=route, status="499") == 1
    assert value(samples, "blink_rejections_total", reason="cancelled") == 1


def test_a_client_that_disconnects_mid_inference_is_counted_499(slow_bundle_dir):
    """A real server: the client hangs up while its batch runs; nothing is sent, 499 counted."""
    with live_server(slow_bundle_dir, threads=1, max_batch_size=1, inline_max_ms=0) as url:
        host, port = url.removeprefix("http://").split(":")
        body = png()
        head = (
            f"POST /classify HTTP/1.1\r\nhost: {host}\r\ncontent-type: image/png\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            deadline = time.monotonic() + 10
            while value(scrape(url), "blink_requests_in_flight") < 1:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.005)
        deadline = time.monotonic() + 10
        counted = {"route": "/classify"}
        while not value(samples := scrape(url), "blink_request_duration_seconds_count", **counted):
            assert time.monotonic() < deadline, "the request was never counted"
            time.sleep(0.01)
    assert value(samples, "blink_requests_total", route="/classify", status="200") == 0
    assert value(samples, "blink_requests_total", route="/classify", status="499") == 1
    assert value(samples, "blink_rejections_total", reason="disconnected") == 1
