"""What decoding and preprocessing one photo costs, with and without JPEG DCT scaling.

DCT scaling (Pillow's `draft`) lets libjpeg decode a large JPEG straight at 1/2, 1/4 or 1/8 of
its size, skipping most of the inverse DCT and the resize's input; without it the full frame is
decoded and then shrunk. Timed in this process on one core, median over repeats of every photo.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from app.preprocess import Preprocessor
from app.service import INLINE_DECODE_PIXELS, LONE_DECODE_PIXELS


@contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the block on one core only; the previous affinity comes back after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def decode_ms(preprocessor: Preprocessor, body: bytes, draft: bool) -> float:
    started = time.perf_counter()
    image = preprocessor.open_image(body)
    if not draft:
        image.draft = lambda *args, **kwargs: None  # type: ignore[method-assign]
    preprocessor.to_tensor(image)
    return (time.perf_counter() - started) * 1000


def where_decoded(body: bytes) -> str:
    """Where the service decodes this image (app/service.py's rule, with the default
    BLINK_INLINE_MAX_MS and a model whose batch of one fits it)."""
    width, height = Image.open(io.BytesIO(body)).size
    if width * height <= INLINE_DECODE_PIXELS:
        return "event loop"
    if width * height <= LONE_DECODE_PIXELS:
        return "event loop when alone, else decode pool"
    return "decode pool"


def decode_costs(preprocessor: Preprocessor, bodies: list[bytes], repeat: int) -> dict:
    """Median ms per image with and without DCT scaling, the source size, where it decodes."""
    result: dict = {}
    for draft in (True, False):
        decode_ms(preprocessor, bodies[0], draft)  # first call pays for lazy imports
        times = [decode_ms(preprocessor, b, draft) for _ in range(repeat) for b in bodies]
        result["draft_ms" if draft else "full_ms"] = spread_ms(times)
    sizes = [Image.open(io.BytesIO(b)).size for b in bodies]
    result["megapixels"] = statistics.median(w * h / 1e6 for w, h in sizes)
    result["kilobytes"] = statistics.median(len(b) / 1000 for b in bodies)
    result["where"] = sorted({where_decoded(b) for b in bodies})
    return result


def spread_ms(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
