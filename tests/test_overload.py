"""Overload: refusals decided before the body is read, and the overload measurement's shape."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import uvloop

from app.settings import Settings
from loadtest.overload import Phase, classify_request, measure_config, table
from tests.conftest import live_server, running_app
from tests.images import png
from tests.test_v2_errors import image_request

PNG = {"content-type": "image/png"}


async def fill_queue(client, depth: int) -> list[asyncio.Future]:
    """Requests that hold the engine and fill the queue to `depth`."""
    service = client.app.state.registry.default.current
    posts = [
        asyncio.ensure_future(client.post("/classify", content=png(i), headers=PNG))
        for i in range(depth + 1)
    ]
    for _ in range(5000):
        if service.batcher.queue_depth == depth:
            return posts
        await asyncio.sleep(0.001)
    pytest.fail(f"the queue never reached {depth}")


class Untouched:
    """A `receive` that records being called: a refusal must not read the body."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        return {"type": "http.request", "body": png(), "more_body": False}


@pytest.mark.parametrize("path", ["/classify", "/v2/models/tiny/infer"])
async def test_full_queue_is_refused_before_the_body_is_read(slow_bundle_dir, path):
    settings = Settings(
        model=slow_bundle_dir, threads=1, max_batch_size=1, queue_capacity=2, inline_max_ms=0
    )
    async with running_app(settings) as client:
        posts = await fill_queue(client, 2)
        receive, sent = Untouched(), []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "query_string": b"",
            "headers": [(b"content-type", b"image/png"), (b"x-request-id", b"over-1")],
            "root_path": "",
        }
        await client.app(scope, receive, send)
        answers = await asyncio.gather(*posts)
        metrics = (await client.get("/metrics")).text
    assert receive.calls == 0
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"retry-after"]) >= 1
    assert headers[b"x-request-id"] == b"over-1"
    error = orjson.loads(body["body"])["error"]
    if path == "/classify":
        assert error["code"] == "overloaded" and error["reason"] == "queue_full"
    else:  # the protocol's shape: a message only
        assert "queue is full" in error
    assert [a.status_code for a in answers] == [200] * 3
    assert 'blink_rejections_total{model="tiny",reason="queue_full"} 1.0' in metrics


async def test_v2_batch_over_the_free_queue_is_refused_after_parsing(slow_bundle_dir):
    settings = Settings(
        model=slow_bundle_dir, threads=1, max_batch_size=1, queue_capacity=3, inline_max_ms=0
    )
    async with running_app(settings) as client:
        posts = await fill_queue(client, 2)
        refused = await client.post("/v2/models/tiny/infer", **image_request(png(), png()))
        await asyncio.gather(*posts)
    assert refused.status_code == 503
    assert refused.headers["retry-after"]


def test_overload_measurement_reports_every_phase(bundle_dir):
    """The measuring tool's structure on a small scale (its thresholds are for the campaign)."""
    # a refused connection is held for at most 50 ms: the short phases still see answers
    settings = {"threads": 1, "max_batch_size": 1, "queue_capacity": 2, "reject_hold_ms": 50}
    with live_server(bundle_dir, **settings) as url:
        host, port = url.removeprefix("http://").split(":")
        phases = uvloop.run(
            measure_config(
                (host, int(port)),
                None,
                png(),
                seconds=0.5,
                warmup_s=0.1,
                connections=40,
                capacity_connections=4,
            )
        )
    assert [p.name for p in phases] == ["capacity", "resend", "capacity", "honour", "capacity"]
    assert all(p.statuses[200] > 0 for p in phases if p.name == "capacity"), phases
    resend = phases[1]
    assert resend.statuses[503] > 0, resend.statuses  # 40 connections for 2 queue places
    assert resend.errors == 0
    rows = table({"tiny": phases}).splitlines()
    assert len(rows) == 2 + len(phases)
    assert "| tiny | resend | 40 |" in rows[3]


def test_client_request_is_well_formed():
    request = classify_request(b"abc")
    head, body = request.split(b"\r\n\r\n")
    assert body == b"abc" and b"content-length: 3" in head
    assert Phase("x", 1, 2.0).goodput == 0
