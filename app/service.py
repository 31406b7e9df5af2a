"""One loaded model version and the request path below HTTP: preprocess, batch, postprocess.

A request takes the version of its model serving at its arrival (`ModelHost.current`, found
through the registry) and keeps it to the end: a reload (app/reload.py) swaps in a new
`ModelService` while the old one drains. What the models of one process share (the decode
pool, the count of requests in progress, the response cache) is a `Shared`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from app.admission import Admission
from app.batch_policy import batch_cap
from app.batching import GoneProbe, MicroBatcher
from app.bundle import Bundle, BundleError, Calibration, load_bundle
from app.cache import ResponseCache
from app.engine import Engine
from app.errors import InvalidParameter, NotReady
from app.metrics import ModelMetrics, ready_workers, worker_models
from app.monitor import PredictionMonitor
from app.preprocess import Preprocessor
from app.settings import Settings, usable_cores

if TYPE_CHECKING:
    from app.batching import _Pending
    from app.candidate import Shadow

log = logging.getLogger("blink.service")

# Below this many source pixels, decoding costs less than a hop to the thread pool and back.
INLINE_DECODE_PIXELS = 128 * 128
# A lone request on an idle service whose model runs inline is decoded inline too, up to camera
# sizes (a few ms): decode and inference on one thread, no hop, the tensor still in its cache.
# Larger images always go to the pool, so the loop keeps reading while they decode.
LONE_DECODE_PIXELS = 4_000_000
CLOSE_POLL_S = 0.01


class Discard:
    """Where answers go when nothing counts them (BLINK_MONITOR=false)."""

    def append(self, rows: np.ndarray) -> None:
        pass


DISCARD = Discard()


class Shared:
    """What every model of a process shares: sized for the machine, not per model."""

    def __init__(self, settings: Settings, cache: ResponseCache | None = None) -> None:
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_threads or usable_cores(), thread_name_prefix="blink-decode"
        )
        self.active = 0  # requests in progress in this process, every model together
        self.cache = cache

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


class ModelService:
    def __init__(
        self,
        settings: Settings,
        metrics: ModelMetrics,
        shared: Shared,
        bundle: Bundle | None = None,
        *,
        name: str | None = None,
    ) -> None:
        """Load (hashes verified) and open the bundle; nothing is published to metrics yet.

        The model is served under `name`, by default `metrics.name` (its directory's name in a
        repository); a candidate version answers under its model's name and keeps series of its
        own.
        """
        self.settings = settings
        self.metrics = metrics
        self.shared = shared
        self.bundle: Bundle = bundle or load_bundle(settings.model)
        manifest = self.bundle.manifest
        self.engine = Engine(
            self.bundle,
            device=settings.device,
            variant=settings.model_variant,
            threads=settings.intra_op_threads(),
            spin_when_alone=settings.spin_when_alone,
            max_batch_size=settings.max_batch_size,
        )
        self.labels = manifest.labels
        self.probabilities = manifest.output.kind == "probabilities"  # no second softmax
        # Scores are softmax(logits / temperature); 1 (no calibration) is the plain softmax.
        self.calibration = manifest.calibration
        self.temperature = self.calibration.temperature if self.calibration else 1.0
        # What every answer says of the model, built once.
        self.name = name or metrics.name
        self.model_fields = {
            "name": self.name,
            "version": manifest.version,
            "variant": self.engine.variant,
        }
        # What, besides the body and the answer's parameters, keys this version's cached answers.
        self.cache = shared.cache
        self.cache_scope = (self.name, manifest.version, self.engine.variant)
        self.active_requests = 0
        # Single-process, the gauges are read at scrape time (app/reload.py); multiprocess, each
        # worker writes every change (a scrape reads other workers' files, not their state).
        self._count_in_flight = metrics.multiprocess
        self.preprocessor = Preprocessor(manifest.input, settings.max_image_pixels)
        self.monitor = PredictionMonitor(
            metrics,
            self.labels,
            manifest.reference,
            temperature=self.temperature,
            probabilities=self.probabilities,
            window=settings.drift_window,
        )
        # Each computed answer's output rows go here (one append); the monitor counts them.
        self.answered = self.monitor.answered if settings.monitor else DISCARD
        self.shadow: Shadow | None = None  # a shadow version mirroring this one's answers
        # the batcher and admission live no longer than this service, so `this()` is never None
        this = cast("Callable[[], ModelService]", weakref.ref(self))
        self.batcher = MicroBatcher(
            self.engine.run,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            queue_capacity=settings.queue_capacity,
            engine_slots=settings.engine_slots,
            observer=metrics,
            on_depth=metrics.queue_depth.set if metrics.multiprocess else None,
            inline_max_s=settings.inline_max_ms / 1000,
            # Under load the loop is needed for reading and decoding: keep inference off it.
            # (Through a weak reference: no cycle, so a retired version is freed by reference
            # counting alone, even when gc.freeze has put it out of the collector's reach.)
            inline_when=lambda: this().alone,
            run_inline=self.engine.run_lone,
        )
        self.admission = Admission(
            self.batcher,
            lambda: this().shared.active,
            capacity=settings.queue_capacity,
            max_concurrency=settings.max_concurrency,
            hold_max_s=settings.reject_hold_ms / 1000,
        )
        self._decode_pool = shared.decode_pool
        self.ready = False
        self.warm_up_error: str | None = None

    @property
    def model_labels(self) -> tuple[str, str, str, str]:
        """`blink_model_info`'s labels for this version."""
        return (
            self.model_fields["name"],
            self.model_fields["version"],
            self.engine.variant,
            self.engine.provider,
        )

    def publish(self) -> None:
        """Name this version in the metrics as the one serving (at start and at each swap)."""
        metrics = self.metrics
        metrics.engine_slots.set(self.settings.engine_slots)
        metrics.ready.set(1 if self.ready else 0)
        if self.cache is not None:  # a new version: the old one's answers are of no more use
            self.cache.drop_model(self.name)
        metrics.model_info.labels(*self.model_labels).set(1)
        metrics.worker_model.labels(self.model_fields["name"], self.model_fields["version"]).set(1)

    def unpublish(self) -> None:
        """This version no longer serves new requests (it may still be draining)."""
        metrics = self.metrics
        metrics.model_info.labels(*self.model_labels).set(0)
        metrics.worker_model.labels(self.model_fields["name"], self.model_fields["version"]).set(0)
        if not metrics.multiprocess:  # single process: drop the series rather than show a 0
            metrics.model_info.remove(*self.model_labels)
            metrics.worker_model.remove(self.model_fields["name"], self.model_fields["version"])

    def not_ready_reason(self) -> str | None:
        """Why this model cannot serve requests yet (in this worker); None once it can."""
        if self.warm_up_error is not None:
            return f"warm-up failed: {self.warm_up_error}"
        if not self.ready:
            return "model is warming up"
        return None

    def request_started(self) -> None:
        self.active_requests += 1
        self.shared.active += 1
        if self._count_in_flight:
            self.metrics.in_flight.inc()

    def request_finished(self) -> None:
        self.active_requests -= 1
        self.shared.active -= 1
        if self._count_in_flight:
            self.metrics.in_flight.dec()

    @property
    def alone(self) -> bool:
        """Whether the request asking is the only one in progress, of any model (a lone request
        may use the event loop for decoding and inference: nothing else needs it)."""
        return self.shared.active <= 1

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    async def warm_up(self) -> None:
        """At start-up: run every batch size once, then ready. A failure is kept for /readyz."""
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.warm_up_engine)
        except Exception as exc:  # never ready; /readyz says why
            self.warm_up_error = str(exc)
            log.exception("warm-up failed", extra={"version": self.model_fields["version"]})
            return
        # Objects alive now live for the whole process: keep the collector from rescanning them.
        gc.collect()
        gc.freeze()
        self.mark_ready(started)

    def mark_ready(self, started: float) -> None:
        self.ready = self.admission.ready = True
        self.metrics.ready.set(1)
        log.info(
            "ready",
            extra={
                "version": self.model_fields["version"],
                "warm_up_s": round(time.perf_counter() - started, 3),
                "batch_cap": self.batcher.max_batch_size,
            },
        )

    def warm_up_engine(self) -> None:
        """Every batch size once, the batch cap from their measured costs, and one answer
        checked against the labels (any thread; the version serves nothing yet)."""
        costs = self.engine.warm_up()
        self.batcher.max_batch_size = batch_cap(
            self.settings.batch_policy, self.settings.max_batch_size, costs
        )
        # One answer checked against the labels: a model whose outputs do not match them would
        # fail (or mislabel) every request, so it must not become ready.
        outputs = self.engine.run(np.zeros((1, *self.engine.input_shape), np.float32))
        if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
            raise BundleError(
                f"the model outputs shape {list(outputs.shape)} for one image, but the manifest "
                f"has {self.num_classes} labels"
            )

    async def preprocess(self, data: bytes) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        image = self.preprocessor.open_image(data)
        width, height = image.size
        pixels = width * height
        if pixels <= INLINE_DECODE_PIXELS or (
            pixels <= LONE_DECODE_PIXELS and self.alone and self.batcher.single_runs_inline
        ):
            tensor = self.preprocessor.to_tensor(image)
        else:  # Pillow releases the GIL while decoding: big images decode beside the loop
            loop = asyncio.get_running_loop()
            tensor = await loop.run_in_executor(
                self._decode_pool, self.preprocessor.to_tensor, image
            )
        elapsed = time.perf_counter() - started
        self.metrics.decode_duration.observe(elapsed)
        return tensor, elapsed

    def submit(
        self, tensor: np.ndarray, deadline: float, client_gone: GoneProbe | None = None
    ) -> _Pending:
        if not self.ready:
            raise NotReady("model is warming up")
        return self.batcher.submit(tensor, deadline, client_gone)

    async def close(self) -> None:
        """Answer everything accepted, then stop; the shared decode pool stays (the registry
        owns it). Requests that took this version but are not queued yet (reading, decoding)
        are waited for too, up to the request timeout."""
        give_up = time.monotonic() + self.settings.request_timeout_ms / 1000
        while self.active_requests and time.monotonic() < give_up:
            await asyncio.sleep(CLOSE_POLL_S)
        await self.batcher.drain()
        self.monitor.flush()


def workers_not_ready(settings: Settings, multiprocess: bool) -> str | None:
    """With several workers any of them may answer a probe: ready means all of them are."""
    workers = settings.workers
    if multiprocess and workers > 1 and (warm := ready_workers()) < workers:
        return f"{warm} of {workers} workers have warmed up"
    return None


def worker_list(own_models: list[dict[str, str]], multiprocess: bool) -> list[dict[str, Any]]:
    """The models and versions each worker process serves; this one's from itself."""
    pid = os.getpid()
    own = [{"pid": pid, **model} for model in own_models]
    if not multiprocess:
        return own
    others = [w for w in worker_models() if w["pid"] != pid]
    return sorted([*own, *others], key=lambda w: (w["pid"], w["name"]))


def coverage_threshold(calibration: Calibration | None, coverage: float) -> float:
    """The score threshold of prediction sets at `coverage`; InvalidParameter, saying what can
    be asked instead, when the bundle recorded none for it (both protocols answer this)."""
    if calibration is None or not calibration.thresholds:
        raise InvalidParameter(
            "this model's bundle has no conformal calibration, so it cannot answer prediction "
            "sets: build it with labelled data (or import it with `blink import --eval DIR`)"
        )
    threshold = calibration.threshold_for(coverage)
    if threshold is None:
        levels = ", ".join(sorted(calibration.thresholds, key=float))
        raise InvalidParameter(
            f"coverage {coverage!r} was not calibrated for this model: ask for one of {levels}"
        )
    return threshold
