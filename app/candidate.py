"""Candidate versions beside a model's serving one: a shadow and a canary.

A **shadow** gets a copy of a fraction of the requests the serving version computed, off the
response path: the request path only puts the mirror on a queue, and the client's answer never
waits for the shadow or fails because of it. A thread of the shadow's own, in the idle
scheduling class (it computes only on a core no other thread wants), gathers mirrors for
`SHADOW_GATHER_S`, runs them as one batch (its session computes on that thread alone) and
compares each top-1 label with the served one. It is shed first: no mirror is queued while
another request is in progress (of any model) or the serving version is busy (anything queued,
or its engine slots all running), or while `SHADOW_QUEUED_BATCHES` batches already wait; a
batch starts only at a moment when no request is in progress; a mirror older than
`SHADOW_DEADLINE_S` is dropped unrun; and when the thread wakes late, because something else
keeps every core busy, it takes no mirror for `SHADOW_BACK_OFF_S`. Compared
answers count in `blink_shadow_requests_total{result="compared"}` and, when the labels agree,
in `blink_shadow_agreements_total`; the shadow's own answers feed its prediction metrics and
drift under `model="<name>:shadow"`.

A **canary** answers a fraction of the model's requests itself; its answers name its version
and its series carry `model="<name>:canary"`. A request with the canary key header goes to the
canary or not by a hash of the header's value, so one value always sees the same version (and
keeps seeing the canary as its fraction grows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import random
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.metrics import ShadowMetrics

if TYPE_CHECKING:
    from app.batching import BatchResult
    from app.service import ModelService
    from app.settings import Settings

log = logging.getLogger("blink.candidate")

SHADOW, CANARY = "shadow", "canary"
# A mirror older than this is not worth running: it would only compete with fresher work.
SHADOW_DEADLINE_S = 1.0
# Mirrors are gathered this long into one batch, and at most this many batches wait.
SHADOW_GATHER_S = 0.01
SHADOW_QUEUED_BATCHES = 4
# Each look at whether a request is in progress takes the interpreter lock from the event loop
# (polling every millisecond cost c=1 latency measurably; every 5 ms did not).
SHADOW_QUIET_POLL_S = 0.005
# Woken this much later than it asked, the shadow's thread waited for a core: something keeps
# every core busy. It then takes no mirror for a while, since a thread of the idle class that
# is preempted while it holds the interpreter lock stalls the event loop until it runs again.
SHADOW_LATE_WAKE_S = 0.02
SHADOW_BACK_OFF_S = 1.0
SHADOW_NICE = 19
HASH_SPACE = 2**32  # zlib.crc32's range


def candidate_settings(settings: Settings, role: str) -> Settings:
    """A shadow's session computes on one thread, its caller (the shadow's, in the
    background); a canary serves as the serving version does."""
    if role != SHADOW:
        return settings
    return settings.model_copy(update={"threads": 1, "spin_when_alone": False})


class Shadow:
    """One model's shadow: a thread of its own, below every other thread of the process."""

    def __init__(
        self, service: ModelService, serving: ModelService, fraction: float, source: str
    ) -> None:
        self.service = service
        self.fraction = fraction
        self.source = source  # as it was named: a version or a path
        self.metrics = ShadowMetrics(service.metrics.family, serving.name)
        self.same_input = False
        self.follow(serving)
        self._max_batch = service.batcher.max_batch_size
        self._queue_bound = SHADOW_QUEUED_BATCHES * self._max_batch
        self._random = random.random
        self.compared = self.agreed = self.shed = self.failed = 0
        self._backing_off = False
        # The request path only puts mirrors here; the thread batches, runs and compares them.
        self._mirrors: queue.SimpleQueue[Mirror | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="blink-shadow", daemon=True)
        self._thread.start()

    def follow(self, serving: ModelService) -> None:
        """Mirror `serving` from now on (at the start, and when a reload swaps in a version)."""
        # Its tensor can be mirrored as it is when both versions preprocess alike.
        self.same_input = self.service.bundle.manifest.input == serving.bundle.manifest.input

    def offer(
        self, serving: ModelService, tensor: np.ndarray, data: bytes | None, served: BatchResult
    ) -> None:
        """Mirror one computed request (on the request path: a draw, a check and a put)."""
        if self.fraction < 1 and self._random() >= self.fraction:
            return
        count = len(tensor)
        if (
            self._backing_off
            or serving.shared.active > 1  # another request in progress, of any model
            or serving.batcher.busy
            or self._mirrors.qsize() >= self._queue_bound
            or count > self._max_batch
        ):
            self._shed(count)  # shed first: the serving version needs the cores
            return
        source = tensor if self.same_input else data
        if source is None:  # V2 tensors in the serving version's shape: nothing it can read
            self._failed(count)
            return
        self._mirrors.put(
            Mirror(source, serving.labels, served.outputs, served.queue_s + served.inference_s,
                   time.monotonic())
        )  # fmt: skip

    # -- the shadow's thread ----------------------------------------------------------------

    def _work(self) -> None:
        idle_priority()
        stopping = False
        while not stopping:
            first = self._mirrors.get()
            if first is None:
                return
            # Gather for a while: one wake-up and one run per batch, not per request (each
            # time this thread holds the GIL, the event loop may wait for it).
            asleep = time.monotonic()
            time.sleep(SHADOW_GATHER_S)
            if time.monotonic() - asleep > SHADOW_GATHER_S + SHADOW_LATE_WAKE_S:
                stopping = self._back_off(first)
                continue
            self._wait_for_a_quiet_moment(first.queued_at + SHADOW_DEADLINE_S)
            batch = [first]
            stopping = self._take_queued(batch, self._max_batch)
            try:
                self._run(batch)
            except Exception:  # counted; the shadow never takes the process down
                log.exception("shadow batch failed", extra={"model": self.service.name})
                self._failed(images(batch))

    def _take_queued(self, batch: list[Mirror], limit: float) -> bool:
        """Move queued mirrors into `batch`, up to `limit` in all; whether a stop was asked."""
        while len(batch) < limit and not self._mirrors.empty():
            mirror = self._mirrors.get_nowait()
            if mirror is None:
                return True
            batch.append(mirror)
        return False

    def _back_off(self, first: Mirror) -> bool:
        """Shed what is queued and take no mirror for `SHADOW_BACK_OFF_S`; whether a stop was
        asked meanwhile."""
        self._backing_off = True
        dropped = [first]
        stopping = self._take_queued(dropped, math.inf)
        self._shed(images(dropped))
        if not stopping:
            time.sleep(SHADOW_BACK_OFF_S)
        self._backing_off = False
        return stopping

    def _wait_for_a_quiet_moment(self, give_up: float) -> None:
        """Start computing only while no request is in progress: one that arrives meanwhile
        still competes with this batch, but never with a queue of them."""
        shared = self.service.shared
        while shared.active and time.monotonic() < give_up:
            time.sleep(SHADOW_QUIET_POLL_S)

    def _run(self, batch: list[Mirror]) -> None:
        now = time.monotonic()
        fresh = [m for m in batch if now - m.queued_at <= SHADOW_DEADLINE_S]
        if len(fresh) < len(batch):  # too old to be worth the cores: dropped
            self._failed(images(batch) - images(fresh))
        if not fresh:
            return
        tensors = [self._tensor(m.source) for m in fresh]
        metrics = self.service.metrics
        started = time.monotonic()
        metrics.batch_started(len(tensors), [started - m.queued_at for m in fresh])
        outputs = self.service.engine.run(np.concatenate(tensors))
        finished = time.monotonic()
        metrics.batch_finished(len(outputs), finished - started)
        self.service.answered.append(outputs)  # the shadow's own predictions and drift
        labels = self.service.labels
        served = [m.labels[i] for m in fresh for i in m.served.argmax(axis=1).tolist()]
        mine = [labels[i] for i in outputs.argmax(axis=1).tolist()]
        agreed = sum(a == b for a, b in zip(mine, served, strict=True))
        count = len(served)  # images: a V2 request may carry several
        self.compared += count
        self.agreed += agreed
        shadow_metrics = self.metrics
        shadow_metrics.compared.inc(count)
        if agreed:
            shadow_metrics.agreed.inc(agreed)
        shadow_metrics.serving_latency.observe_all([m.served_s for m in fresh])
        shadow_metrics.shadow_latency.observe_all([finished - m.queued_at for m in fresh])

    def _tensor(self, source: np.ndarray | bytes) -> np.ndarray:
        if isinstance(source, np.ndarray):
            return source
        preprocessor = self.service.preprocessor  # another input: decoded again, here
        return preprocessor.to_tensor(preprocessor.open_image(source))

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
        """Stop after the mirrors already queued (they are quick, or dropped as too old)."""
        self._mirrors.put(None)
        await asyncio.to_thread(self._thread.join)
        await self.service.close()


@dataclass(frozen=True, slots=True)
class Mirror:
    source: np.ndarray | bytes  # the serving version's tensor, or the image to decode again
    labels: list[str]  # the serving version's
    served: np.ndarray  # its output rows, one per image
    served_s: float  # its queue wait plus inference
    queued_at: float


def images(mirrors: list[Mirror]) -> int:
    """How many images `mirrors` carry (a V2 request may carry several)."""
    return sum(len(m.served) for m in mirrors)


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


def idle_priority() -> None:
    """Put the calling thread in the idle scheduling class (Linux: per thread). It computes on
    a core only while no other thread wants that core, and a serving thread that wakes takes
    the core from it at once, where a nice 19 thread may first finish its time slice. Like
    nice 19, it still gets a sliver of a busy core, so a lock it holds is released in the end.
    Nice 19 where the class is missing."""
    lower_priority(SHADOW_NICE)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def lower_priority(nice: int) -> None:
    """Give the calling thread (Linux: a nice value applies per thread) a lower CPU priority."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
