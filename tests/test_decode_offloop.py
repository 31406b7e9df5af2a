"""Decoding a 12-megapixel JPEG never holds the event loop: small requests keep flowing.

A real server decodes several 12-MP camera JPEGs at once. Its event loop's own CPU time over
those requests (reading bodies, parsing headers) must stay well below what decoding one of them
costs, measured here in the same run: CPU time, unlike latency, does not depend on how busy the
machine is. Meanwhile four clients keep posting small images (decoded on the loop, batched,
answered), and they must keep being answered while the large ones are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.bundle import load_bundle
from app.preprocess import Preprocessor
from bench.photo_bodies import camera_jpeg, source_photos
from loadtest.processes import stop_process
from tests.conftest import spawn_server, wait_for
from tests.onnx_models import write_bundle

LARGE = 6  # more than the decode pool has threads, so large decodes queue for a while
SMALL_CLIENTS = 4


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory: pytest.TempPathFactory):
    return write_bundle(tmp_path_factory.mktemp("rgb") / "rgb" / "1", channels=3, size=32)


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return camera_jpeg(source_photos()[0], 12.0, Image.Resampling.BILINEAR)  # quick to make


def small_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def one_decode_cpu_s(bundle_dir, body: bytes) -> float:
    """CPU time of decoding one large JPEG here (median of three)."""
    preprocess = Preprocessor(load_bundle(bundle_dir).manifest.input)
    times = []
    for _ in range(3):
        started = time.thread_time()
        preprocess(body)
        times.append(time.thread_time() - started)
    return statistics.median(times)


@contextlib.contextmanager
def server_with_pid(bundle_dir) -> Iterator[tuple[str, int]]:
    process, url = spawn_server(bundle_dir, threads=1, workers=1)
    try:
        wait_for(url, "/readyz", process, 60)
        yield url, process.pid
    finally:
        stop_process(process)


def loop_cpu_s(pid: int) -> float:
    """CPU time of the server's event loop: uvicorn's main thread, whose id is the pid."""
    # schedstat's first field is nanoseconds on a CPU: finer than stat's clock ticks
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


async def test_12mp_jpegs_decode_beside_the_loop_while_small_requests_flow(rgb_bundle, large_jpeg):
    width, height = Image.open(io.BytesIO(large_jpeg)).size
    assert width * height > 11_000_000
    small = small_png()
    with server_with_pid(rgb_bundle) as (url, pid):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def post(body: bytes, content_type: str) -> None:
                response = await client.post(
                    "/classify", content=body, headers={"content-type": content_type}
                )
                assert response.status_code == 200, response.text

            async def large_batch() -> None:
                await asyncio.gather(*[post(large_jpeg, "image/jpeg") for _ in range(LARGE)])

            await post(large_jpeg, "image/jpeg")  # warm the pool and the connections
            # 1. The loop's own CPU over large requests alone: reading and header parsing,
            # not decoding (were it decoding, it would be at least one decode per request).
            before = loop_cpu_s(pid)
            await large_batch()
            loop_per_large = (loop_cpu_s(pid) - before) / LARGE

            # 2. Small requests keep being read, batched and answered meanwhile.
            stop = asyncio.Event()
            small_answered: list[float] = []

            async def small_client() -> None:
                while not stop.is_set():
                    await post(small, "image/png")
                    small_answered.append(time.monotonic())

            clients = [asyncio.create_task(small_client()) for _ in range(SMALL_CLIENTS)]
            while len(small_answered) < 2 * SMALL_CLIENTS:  # every small client is flowing
                await asyncio.sleep(0.001)
            large_sent = time.monotonic()
            await large_batch()
            large_done = time.monotonic()
            stop.set()
            await asyncio.gather(*clients)

    decode_cpu = one_decode_cpu_s(rgb_bundle, large_jpeg)
    assert loop_per_large < decode_cpu / 2, (loop_per_large, decode_cpu)
    during = [at for at in small_answered if large_sent < at <= large_done]
    assert len(during) >= LARGE, (len(during), large_done - large_sent)
