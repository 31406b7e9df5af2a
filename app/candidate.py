"""Candidate versions beside a model's serving one: a shadow and a canary.

A **shadow** gets a copy of a fraction of the requests the serving version answered, off the
response path: the client's answer has gone (or goes) without waiting for it, and its failures
are only counted. It is shed first: a mirror is not sent while the serving version is busy
(anything queued, or its engine slots all running) or while the shadow's own short queue is
full, and its engine runs one thread at a lower CPU priority, so the serving version keeps the
cores. Each compared answer counts in `blink_shadow_requests_total{result="compared"}` and, when
both versions' top-1 labels agree, in `blink_shadow_agreements_total`; the shadow's own
answers feed its prediction metrics and drift under `model="<name>:shadow"`.

A **canary** answers a fraction of the model's requests itself; its answers name its version
and its series carry `model="<name>:canary"`. A request with the canary key header goes to the
canary or not by a hash of the header's value, so one value always sees the same version (and
keeps seeing the canary as its fraction grows).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from app.batching import BatchResult, lower_priority
from app.errors import BlinkError
from app.metrics import ShadowMetrics

if TYPE_CHECKING:
    from app.service import ModelService
    from app.settings import Settings

SHADOW, CANARY = "shadow", "canary"
# A mirror older than this is not worth running: it would only compete with fresher work.
SHADOW_DEADLINE_S = 1.0
SHADOW_NICE = 10
HASH_SPACE = 2**32  # zlib.crc32's range


def candidate_settings(settings: Settings, role: str) -> Settings:
    """A shadow computes on one engine thread, never on the event loop, with a queue of one
    batch; a canary serves as the serving version does."""
    if role != SHADOW:
        return settings
    return settings.model_copy(
        update={
            "threads": 1,  # the session computes in its (low-priority) caller thread
            "spin_when_alone": False,
            "inline_max_ms": 0.0,
            "engine_slots": 1,
            "queue_capacity": settings.max_batch_size,
        }
    )


class Shadow:
    def __init__(
        self, service: ModelService, serving: ModelService, fraction: float, source: str
    ) -> None:
        self.service = service
        self.fraction = fraction
        self.source = source  # as it was named: a version or a path
        self.metrics = ShadowMetrics(service.metrics.family, serving.name)
        # The serving version's tensor can be mirrored as it is when both preprocess alike.
        self.same_input = service.bundle.manifest.input == serving.bundle.manifest.input
        self._decode_pool: ThreadPoolExecutor | None = None
        if not self.same_input:
            self._decode_pool = ThreadPoolExecutor(
                1, "blink-shadow-decode", initializer=lower_priority, initargs=(SHADOW_NICE,)
            )
        self._random = random.random
        self.compared = self.agreed = self.shed = self.failed = 0

    def offer(
        self, serving: ModelService, tensor: np.ndarray, data: bytes | None, served: BatchResult
    ) -> None:
        """Mirror one computed request (on the request path: returns at once)."""
        if self.fraction < 1 and self._random() >= self.fraction:
            return
        if serving.batcher.busy or len(tensor) > self.service.batcher.max_batch_size:
            self._shed(len(tensor))  # shed first: the serving version needs the cores
            return
        served_labels = [serving.labels[i] for i in served.outputs.argmax(axis=1)]
        served_s = served.queue_s + served.inference_s
        if self.same_input:
            self._submit(tensor, served_labels, served_s)
        elif data is not None and self._decode_pool is not None:
            loop = asyncio.get_running_loop()
            decoded = loop.run_in_executor(self._decode_pool, self._decode, data)
            decoded.add_done_callback(partial(self._decoded, served_labels, served_s))
        else:  # V2 tensors in the serving version's shape: nothing the shadow can read
            self._failed(len(tensor))

    def _decode(self, data: bytes) -> np.ndarray:
        preprocessor = self.service.preprocessor
        return preprocessor.to_tensor(preprocessor.open_image(data))

    def _decoded(
        self, served_labels: list[str], served_s: float, done: asyncio.Future[np.ndarray]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            self._failed(len(served_labels))
            return
        self._submit(done.result(), served_labels, served_s)

    def _submit(self, tensor: np.ndarray, served_labels: list[str], served_s: float) -> None:
        try:
            pending = self.service.submit(tensor, time.monotonic() + SHADOW_DEADLINE_S)
        except BlinkError:  # its queue is full (or it is closing): shed
            self._shed(len(tensor))
            return
        pending.future.add_done_callback(partial(self._compare, served_labels, served_s))

    def _compare(
        self, served_labels: list[str], served_s: float, done: asyncio.Future[BatchResult]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            self._failed(len(served_labels))
            return
        result = done.result()
        self.service.answered.append(result.outputs)  # the shadow's own predictions and drift
        labels = self.service.labels
        agreed = sum(
            labels[i] == served
            for i, served in zip(result.outputs.argmax(axis=1), served_labels, strict=True)
        )
        count = len(served_labels)
        self.compared += count
        self.agreed += agreed
        metrics = self.metrics
        metrics.compared.inc(count)
        if agreed:
            metrics.agreed.inc(agreed)
        metrics.serving_latency.observe(served_s)
        metrics.shadow_latency.observe(result.queue_s + result.inference_s)

    def _shed(self, count: int) -> None:
        self.shed += count
        self.metrics.shed.inc(count)

    def _failed(self, count: int) -> None:
        self.failed += count
        self.metrics.failed.inc(count)

    def describe(self) -> dict[str, Any]:
        return {
            **describe(self.service, self.source, self.fraction),
            "compared": self.compared,
            "agreement": round(self.agreed / self.compared, 6) if self.compared else None,
            "shed": self.shed,
            "failed": self.failed,
        }

    async def close(self) -> None:
        await self.service.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)


class Canary:
    def __init__(self, service: ModelService, fraction: float, source: str, key_header: str):
        self.service = service
        self.fraction = fraction
        self.source = source
        self._key_header = key_header.lower().encode("latin-1")
        self._threshold = fraction * HASH_SPACE
        self._random = random.random

    def choose(self, serving: ModelService, headers: list[tuple[bytes, bytes]]) -> ModelService:
        """The version that answers a request with these (raw ASGI) headers."""
        for name, value in headers:
            if name == self._key_header:
                return self.service if zlib.crc32(value) < self._threshold else serving
        return self.service if self._random() < self.fraction else serving

    def describe(self) -> dict[str, Any]:
        return describe(self.service, self.source, self.fraction)

    async def close(self) -> None:
        await self.service.close()


def describe(service: ModelService, source: str, fraction: float) -> dict[str, Any]:
    return {
        "version": service.model_fields["version"],
        "candidate": source,
        "fraction": fraction,
        "series": service.metrics.name,
    }
