"""The loaded model and the request path below HTTP: preprocess, batch, postprocess."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.admission import Admission
from app.batching import GoneProbe, MicroBatcher
from app.bundle import Bundle, load_bundle
from app.engine import Engine
from app.errors import NotReady
from app.metrics import ServiceMetrics, ready_workers
from app.preprocess import Preprocessor
from app.settings import Settings, usable_cores

log = logging.getLogger("blink.service")

# Below this many source pixels, decoding costs less than a hop to the thread pool and back.
INLINE_DECODE_PIXELS = 128 * 128


class ModelService:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bundle: Bundle = load_bundle(settings.model)
        manifest = self.bundle.manifest
        self.engine = Engine(
            self.bundle,
            device=settings.device,
            variant=settings.model_variant,
            threads=settings.intra_op_threads(),
            max_batch_size=settings.max_batch_size,
        )
        self.labels = manifest.labels
        # What every answer says of the model, built once.
        self.model_fields = {
            "name": manifest.name,
            "version": manifest.version,
            "variant": self.engine.variant,
        }
        self.active_requests = 0
        live_gauges = metrics.watch(lambda: self.batcher.queue_depth, lambda: self.active_requests)
        self._count_in_flight = not live_gauges  # multiprocess: every change is written
        self.preprocessor = Preprocessor(manifest.input, settings.max_image_pixels)
        self.batcher = MicroBatcher(
            self.engine.run,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            queue_capacity=settings.queue_capacity,
            engine_slots=settings.engine_slots,
            observer=metrics,
            on_depth=None if live_gauges else metrics.queue_depth.set,
            inline_max_s=settings.inline_max_ms / 1000,
            # Under load the loop is needed for reading and decoding: keep inference off it.
            inline_when=lambda: self.active_requests <= 1,
        )
        self.admission = Admission(
            self.batcher,
            lambda: self.active_requests,
            capacity=settings.queue_capacity,
            max_concurrency=settings.max_concurrency,
            hold_max_s=settings.reject_hold_ms / 1000,
        )
        pool_size = settings.decode_threads or usable_cores()
        self._decode_pool = ThreadPoolExecutor(pool_size, thread_name_prefix="blink-decode")
        self.ready = False
        self.warm_up_error: str | None = None
        metrics.engine_slots.set(settings.engine_slots)
        metrics.ready.set(0)
        metrics.model_info.labels(
            manifest.name, manifest.version, self.engine.variant, self.engine.provider
        ).set(1)

    def not_ready_reason(self) -> str | None:
        """Why requests cannot be served yet; None once they can (in every worker)."""
        if self.warm_up_error is not None:
            return f"warm-up failed: {self.warm_up_error}"
        if not self.ready:
            return "model is warming up"
        # With several workers, any of them may answer a probe: ready means all of them are.
        workers = self.settings.workers
        if self.metrics.multiprocess and workers > 1 and (warm := ready_workers()) < workers:
            return f"{warm} of {workers} workers have warmed up"
        return None

    def request_started(self) -> None:
        self.active_requests += 1
        if self._count_in_flight:
            self.metrics.in_flight.inc()

    def request_finished(self) -> None:
        self.active_requests -= 1
        if self._count_in_flight:
            self.metrics.in_flight.dec()

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    async def warm_up(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.warm_up)
        except Exception as exc:  # never ready; /readyz says why
            self.warm_up_error = str(exc)
            log.exception("warm-up failed")
            return
        # Objects alive now live for the whole process: keep the collector from rescanning them.
        gc.collect()
        gc.freeze()
        self.ready = self.admission.ready = True
        self.metrics.ready.set(1)
        log.info("ready", extra={"warm_up_s": round(time.perf_counter() - started, 3)})

    async def preprocess(self, data: bytes) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        image = self.preprocessor.open_image(data)
        width, height = image.size
        if width * height <= INLINE_DECODE_PIXELS:
            tensor = self.preprocessor.to_tensor(image)
        else:  # Pillow releases the GIL while decoding: big images decode beside the loop
            loop = asyncio.get_running_loop()
            tensor = await loop.run_in_executor(
                self._decode_pool, self.preprocessor.to_tensor, image
            )
        elapsed = time.perf_counter() - started
        self.metrics.decode_duration.observe(elapsed)
        return tensor, elapsed

    def submit(self, tensor: np.ndarray, deadline: float, client_gone: GoneProbe | None = None):
        if not self.ready:
            raise NotReady("model is warming up")
        return self.batcher.submit(tensor, deadline, client_gone)

    async def close(self) -> None:
        await self.batcher.drain()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
