"""A real uvicorn server: batching under concurrency, overload, deadlines, disconnects, workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from app.bundle import load_bundle
from app.metrics import ServiceMetrics, ready_workers
from app.postprocess import top_k
from app.preprocess import Preprocessor
from app.registry import ModelRegistry
from app.settings import Settings
from loadtest.processes import stop_process
from tests.conftest import live_server
from tests.images import png
from tests.metrics_text import scrape, value

PNG = {"content-type": "image/png"}


async def post_all(url: str, bodies: list[bytes], **params) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/classify", content=b, headers=PNG, params=params) for b in bodies)
        )


def reference_predictions(bundle_dir, body: bytes, variant_file: str) -> list[dict]:
    """The same image run alone through its own session: what batching must reproduce."""
    manifest = load_bundle(bundle_dir).manifest
    session = ort.InferenceSession(
        str(bundle_dir / variant_file), providers=["CPUExecutionProvider"]
    )
    tensor = Preprocessor(manifest.input)(body)
    (logits,) = session.run(["logits"], {"input": tensor})
    return top_k(logits[0], 10, manifest.labels)


def test_concurrent_requests_form_batches_with_single_image_answers(slow_bundle_dir):
    bodies = [png(seed) for seed in range(24)]
    with live_server(slow_bundle_dir, max_batch_size=32, threads=1) as url:
        responses = asyncio.run(post_all(url, bodies, top_k=10))
        samples = scrape(url)
    assert [r.status_code for r in responses] == [200] * 24
    batches = value(samples, "blink_batch_size_count")
    assert value(samples, "blink_batch_size_sum") == 24
    assert batches < 24, "no batch larger than one image formed"
    for body, response in zip(bodies, responses, strict=True):
        assert response.json()["predictions"] == reference_predictions(
            slow_bundle_dir, body, "model.onnx"
        )


def test_full_queue_answers_503_with_retry_after(slow_bundle_dir):
    with live_server(slow_bundle_dir, queue_capacity=2, max_batch_size=2) as url:
        responses = asyncio.run(post_all(url, [png(i) for i in range(12)]))
        samples = scrape(url)
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and 200 in statuses and set(statuses) <= {200, 503}
    for r in rejected:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    assert value(samples, "blink_rejections_total", reason="queue_full") == len(rejected)
    assert value(samples, "blink_batch_size_sum") == statuses.count(200)


def test_deadline_answers_504_and_queued_requests_never_run(slow_bundle_dir):
    with live_server(slow_bundle_dir, request_timeout_ms=60, max_batch_size=1) as url:
        responses = asyncio.run(post_all(url, [png(i) for i in range(6)]))
        time.sleep(1)  # let the batch that was running when its deadline passed finish
        samples = scrape(url)
    late = [r for r in responses if r.status_code == 504]
    assert len(late) >= 5, [r.status_code for r in responses]
    assert all(r.json()["error"]["code"] == "deadline_exceeded" for r in late)
    assert value(samples, "blink_rejections_total", reason="deadline") == len(late)
    # With batches of one, at most the first two requests can have reached the engine.
    assert value(samples, "blink_batch_size_sum") <= 2


def test_disconnected_client_request_never_reaches_the_engine(slow_bundle_dir):
    with live_server(slow_bundle_dir, max_batch_size=8) as url:

        async def scenario() -> int:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                busy = asyncio.ensure_future(client.post("/classify", content=png(1), headers=PNG))
                # Until `busy`'s batch has started (a batch costs ~90 ms): sent any earlier, the
                # second request could reach the idle engine first.
                while not value(
                    await asyncio.to_thread(scrape, url), "blink_queue_wait_seconds_count"
                ):
                    await asyncio.sleep(0.005)
                host, port = urlsplit(url).hostname, urlsplit(url).port
                body = png(2)
                with socket.create_connection((host, port)) as raw:
                    raw.sendall(
                        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    await asyncio.sleep(0.01)
                return (await busy).status_code

        assert asyncio.run(scenario()) == 200
        samples = {}
        for _ in range(100):
            samples = scrape(url)
            if value(samples, "blink_rejections_total", reason="disconnected"):
                break
            time.sleep(0.05)
        time.sleep(0.5)  # had it been queued, its batch would have run by now
        samples = scrape(url)
    assert value(samples, "blink_rejections_total", reason="disconnected") == 1
    assert value(samples, "blink_batch_size_sum") == 1
    assert value(samples, "blink_requests_total", route="/classify", status="499") == 1


def test_not_ready_until_warm_up_finishes(slow_bundle_dir):
    with live_server(slow_bundle_dir, wait_ready=False, max_batch_size=16, threads=1) as url:
        first = httpx.get(url + "/readyz")
        classify = httpx.post(url + "/classify", content=png(), headers=PNG)
        cold = scrape(url)
        assert first.status_code == 503, "warm-up of 16 slow batch sizes cannot be done yet"
        assert value(cold, "blink_ready") == 0
        assert first.json()["error"]["code"] == "not_ready"
        assert classify.status_code == 503 and classify.headers["retry-after"] == "1"
        for _ in range(600):
            if httpx.get(url + "/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/readyz").status_code == 200
        assert httpx.post(url + "/classify", content=png(), headers=PNG).status_code == 200
        assert value(scrape(url), "blink_ready") == 1


def test_two_workers_share_one_set_of_metrics(bundle_dir, tmp_path):
    with live_server(bundle_dir, workers=2, threads=1, env={"TMPDIR": str(tmp_path)}) as url:
        # /readyz said ready (live_server waited for it): every worker has warmed up
        assert value(scrape(url), "blink_ready") == 1
        bodies = [png(i) for i in range(40)]
        for body in bodies:  # a new connection each: the kernel spreads them over workers
            assert httpx.post(url + "/classify", content=body, headers=PNG).status_code == 200
        samples = scrape(url)
        assert list(tmp_path.glob("blink-metrics-*/*.db")), "the workers' shared metric files"
    assert not list(tmp_path.glob("blink-metrics-*")), "the server removes the directory it made"
    assert value(samples, "blink_engine_slots") == 2  # one slot per worker, summed
    assert value(samples, "blink_requests_total", route="/classify", status="200") == 40
    assert value(samples, "blink_request_duration_seconds_count", route="/classify") == 40
    assert value(samples, "blink_batch_size_sum") == 40


@pytest.mark.parametrize("workers", [1, 2])
def test_queue_and_in_flight_gauges_read_live(slow_bundle_dir, tmp_path, workers):
    """One worker reads them at scrape time, several write each change: both show the load."""
    env = {"TMPDIR": str(tmp_path)}
    # A generous deadline: the test is about the gauges, and a busy machine slows every batch.
    settings = {"max_batch_size": 1, "threads": 1, "request_timeout_ms": 120_000}
    with live_server(slow_bundle_dir, workers=workers, env=env, **settings) as url:

        async def scenario() -> tuple[float, float]:
            posts = asyncio.ensure_future(post_all(url, [png(i) for i in range(12)]))
            depth = in_flight = 0.0
            while not posts.done():
                samples = await asyncio.to_thread(scrape, url)
                depth = max(depth, value(samples, "blink_queue_depth"))
                in_flight = max(in_flight, value(samples, "blink_requests_in_flight"))
                await asyncio.sleep(0.01)
            assert [r.status_code for r in posts.result()] == [200] * 12
            return depth, in_flight

        depth, in_flight = asyncio.run(scenario())
        idle = scrape(url)
    # one image a batch, tens of ms each: most of the twelve wait while one runs
    assert depth >= 2 and in_flight >= 3, (depth, in_flight)
    assert value(idle, "blink_queue_depth") == 0
    assert value(idle, "blink_requests_in_flight") == 0


FAKE_WORKER = """
import sys, time
from app.metrics import ServiceMetrics
ServiceMetrics().worker_ready.set(int(sys.argv[1]))
print("set", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def fake_workers(directory, *ready: str) -> Iterator[list[subprocess.Popen]]:
    """Processes that publish `blink_worker_ready` in a multiprocess directory, as workers do."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    workers = [
        subprocess.Popen([sys.executable, "-c", FAKE_WORKER, r], env=env, stdout=subprocess.PIPE)
        for r in ready
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline() == b"set\n"
        yield workers
    finally:
        for worker in workers:
            stop_process(worker)
            worker.stdout.close()


def test_readiness_counts_live_warmed_workers(tmp_path, monkeypatch):
    """Each worker warms up alone; a killed one's files must not count for its cold successor."""
    with fake_workers(tmp_path, "1", "1", "0") as workers:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        assert ready_workers() == 2
        workers[0].kill()  # no clean exit: its files stay behind
        workers[0].wait()
        assert len(list(tmp_path.glob("gauge_livemin_*.db"))) == 3
        assert ready_workers() == 1


async def test_warm_worker_is_not_ready_until_every_worker_is(bundle_dir, tmp_path, monkeypatch):
    """/readyz and V2's ready routes ask the registry, which counts the other workers.

    prometheus_client chose in-memory values when this process imported it, so this worker's
    own gauge is not in the directory: the fake workers stand for every worker.
    """
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    registry = ModelRegistry(Settings(model=bundle_dir, threads=1, workers=3))
    registry.open(ServiceMetrics())
    try:
        await registry.warm_up()
        assert registry.own_not_ready_reason() is None
        with fake_workers(tmp_path, "1", "0"):
            assert registry.not_ready_reason() == "1 of 3 workers have warmed up"
        with fake_workers(tmp_path, "1", "1", "1"):
            assert registry.not_ready_reason() is None
    finally:
        await registry.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) absent")
def test_metrics_pass_promtool(bundle_dir):
    with live_server(bundle_dir) as url:
        asyncio.run(post_all(url, [png(i) for i in range(8)]))
        httpx.post(url + "/classify", content=b"junk", headers=PNG)
        text = httpx.get(url + "/metrics").text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blink_queue_wait_seconds_bucket" in text
    assert np.isfinite(float(text.split("blink_model_info{")[1].split("} ")[1].split()[0]))
