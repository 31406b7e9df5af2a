"""Where the service decodes an image: on the event loop or in the decode pool.

A lone request on an idle service whose model runs inline is decoded on the loop up to
`LONE_DECODE_PIXELS` (no hop, the tensor stays in that core's cache); anything larger, or any
request that has company, decodes in the pool so the loop keeps reading. The real decoder runs;
the test only notes which thread called it.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from app.metrics import ServiceMetrics
from app.service import LONE_DECODE_PIXELS, ModelService, Shared
from app.settings import Settings
from tests.onnx_models import write_bundle


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory: pytest.TempPathFactory):
    return write_bundle(tmp_path_factory.mktemp("rgb") / "rgb" / "1", channels=3, size=32)


def jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def decoding_thread(service: ModelService, body: bytes) -> str:
    """The name of the thread that turned `body` into a tensor."""
    threads: list[str] = []
    to_tensor = service.preprocessor.to_tensor

    def noting(image):
        threads.append(threading.current_thread().name)
        return to_tensor(image)

    service.preprocessor.to_tensor = noting  # type: ignore[method-assign]
    try:
        tensor, _ = await service.preprocess(body)
    finally:
        service.preprocessor.to_tensor = to_tensor  # type: ignore[method-assign]
    assert tensor.shape == (1, 3, 32, 32)
    return threads[0]


async def served_service(bundle, **settings) -> ModelService:
    """Warmed up, with one lone request answered (the batcher now knows a batch of one's time)."""
    settings_ = Settings(model=bundle, threads=1, **settings)
    metrics = ServiceMetrics().for_model("placement")
    service = ModelService(settings_, metrics, Shared(settings_))
    await service.warm_up()
    assert service.ready
    lone = np.zeros((1, 3, 32, 32), np.float32)
    await service.batcher.wait(service.submit(lone, time.monotonic() + 5))
    return service


@pytest.mark.parametrize(
    ("width", "height", "active", "where"),
    [
        (1000, 1000, 1, "loop"),  # a lone camera-sized photo: no hop
        (1000, 1000, 2, "pool"),  # company: the loop is needed for reading
        (2500, 2000, 1, "pool"),  # above LONE_DECODE_PIXELS: always the pool
        (100, 100, 3, "loop"),  # tiny: cheaper than any hop, whatever the load
    ],
)
async def test_decode_placement(rgb_bundle, width, height, active, where):
    service = await served_service(rgb_bundle)
    try:
        assert service.batcher.single_runs_inline
        for _ in range(active):
            service.request_started()
        thread = await decoding_thread(service, jpeg(width, height))
        loop_thread = threading.main_thread().name
        assert (thread == loop_thread) == (where == "loop"), (thread, width * height)
        if where == "pool":
            assert thread.startswith("blink-decode")
    finally:
        await service.close()
    assert 2500 * 2000 > LONE_DECODE_PIXELS >= 1000 * 1000


async def test_no_inline_decode_when_inline_inference_is_off(rgb_bundle):
    service = await served_service(rgb_bundle, inline_max_ms=0)
    try:
        assert not service.batcher.single_runs_inline
        service.request_started()
        assert (await decoding_thread(service, jpeg(1000, 1000))).startswith("blink-decode")
    finally:
        await service.close()
