"""Dynamic micro-batching in front of any `[N, ...] -> [N, ...]` callable.

The policy is two pure functions (`dispatch_delay`, `batch_take`) that need no event loop.
`MicroBatcher` is the asyncio plumbing around them: a bounded queue, per-request deadlines,
cancellation, and a pool of engine slots. It is event-driven rather than polling: it tries to
dispatch when a request arrives, when a batch finishes and when a queue-delay timer fires, so a
lone request goes straight to a free engine and batches grow on their own while it is busy.
A request may carry a `client_gone` probe: one that reads true when its batch forms is dropped.

Handing a batch to the engine thread and back costs a thread wake-up each way (bench/photos.py
measures the c=1 latency it adds to). A lone request on an idle engine is the case where that
is pure latency, so when the last batch of one took at most `inline_max_s` (and
`inline_when()`, if given, reads true: the service passes "no other request is in progress"),
such a request runs on the event loop itself. The decision waits for the end of the current
pass of the loop, so requests that arrived together are still batched together, on the engine
thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol, overload

import numpy as np

from app.drain import DrainRate, retry_after_s
from app.errors import QUEUE_FULL, DeadlineExceeded, Overloaded

BatchFn = Callable[[np.ndarray], np.ndarray]
GoneProbe = Callable[[], bool]


def dispatch_delay(
    queued_items: int,
    oldest_age_s: float,
    slot_free: bool,
    max_batch_size: int,
    max_queue_delay_s: float,
) -> float | None:
    """Send now (0.0), re-check after this many seconds, or nothing to do (None)."""
    if queued_items == 0 or not slot_free:
        return None
    if queued_items >= max_batch_size or oldest_age_s >= max_queue_delay_s:
        return 0.0
    return max_queue_delay_s - oldest_age_s


def batch_take(sizes: Sequence[int], max_batch_size: int) -> int:
    """How many requests from the head of the queue fit in one batch (always at least one)."""
    total = 0
    for taken, size in enumerate(sizes):
        if taken and total + size > max_batch_size:
            return taken
        total += size
    return len(sizes)


class BatchObserver(Protocol):
    def batch_started(self, size: int, queue_waits_s: list[float]) -> None: ...
    def batch_finished(self, size: int, inference_s: float) -> None: ...


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent back."""


@dataclass(slots=True)
class BatchResult:
    outputs: np.ndarray  # this request's rows of the batch output
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(slots=True, eq=False)
class _Pending:
    inputs: np.ndarray
    enqueued_at: float
    future: asyncio.Future[BatchResult]
    client_gone: GoneProbe | None
    queued: bool = True
    timer: asyncio.TimerHandle | None = field(default=None)


class MicroBatcher:
    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.0,
        queue_capacity: int = 1024,
        engine_slots: int = 1,
        observer: BatchObserver | None = None,
        on_depth: Callable[[int], object] | None = None,
        inline_max_s: float = 0.0,
        inline_when: Callable[[], bool] | None = None,
        run_inline: BatchFn | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._run_inline = run_inline or run_batch
        self.max_batch_size = max_batch_size
        self._max_queue_delay_s = max_queue_delay_s
        self._queue_capacity = queue_capacity
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._free_slots = engine_slots
        self._executor = ThreadPoolExecutor(engine_slots, thread_name_prefix="blink-engine")
        self._observer = observer
        self._on_depth = on_depth  # told the queue depth on every change
        self._delay_timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Future[tuple[np.ndarray, float]]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inline_max_s = inline_max_s
        self._single_s: float | None = None  # how long the last batch of one item ran
        self._inline_check: asyncio.Handle | None = None
        self._inline_when = inline_when
        self.drain_rate = DrainRate()  # admission and Retry-After read it

    @property
    def queue_depth(self) -> int:
        return self._queued_items

    @property
    def busy(self) -> bool:
        """Whether a request now would wait: something queued, or every engine slot running."""
        return self._queued_items > 0 or self._free_slots == 0 or self._inline_check is not None

    def submit(
        self, inputs: np.ndarray, deadline: float, client_gone: GoneProbe | None = None
    ) -> _Pending:
        """Queue `inputs` ([n, ...], n <= max_batch_size); `deadline` is on `time.monotonic`.

        Returns a handle to `wait()` on; raises `Overloaded` at once when the queue is full.
        If `client_gone()` reads true when the request's batch forms, it fails with `ClientGone`
        instead of running.
        """
        size = len(inputs)
        if not 0 < size <= self.max_batch_size:
            raise ValueError(f"a request must hold 1..{self.max_batch_size} items, not {size}")
        if self._queued_items + size > self._queue_capacity:
            queued = self._queued_items
            raise Overloaded.because(QUEUE_FULL, retry_after_s(queued, self.drain_rate.per_second))
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        now = time.monotonic()
        pending = _Pending(inputs, now, loop.create_future(), client_gone)
        # Relative delay: uvloop's clock is not guaranteed to share time.monotonic()'s origin.
        pending.timer = loop.call_later(deadline - now, self._expire, pending)
        self._queue.append(pending)
        self._queued_items += size
        self._notify_depth()
        self._maybe_dispatch()
        return pending

    async def wait(self, pending: _Pending) -> BatchResult:
        try:
            return await pending.future
        except BaseException:
            self._forget(pending)  # cancelled or expired: never run it
            raise

    async def run(self, inputs: np.ndarray, deadline: float) -> BatchResult:
        return await self.wait(self.submit(inputs, deadline))

    def cancel(self, pending: _Pending, reason: BaseException) -> None:
        """Answer `pending` with `reason` and drop it if it has not started running."""
        if not pending.future.done():
            pending.future.set_exception(reason)
        self._forget(pending)

    async def drain(self) -> None:
        """Wait until every queued and running request has been answered."""
        while self._queue or self._running:
            waiters = [p.future for p in self._queue] + list(self._running)
            await asyncio.wait(waiters)
        self._executor.shutdown(wait=True)

    # -- internals -------------------------------------------------------------------------

    def _forget(self, pending: _Pending) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if pending.queued:  # rare (timeouts, disconnects): O(n) removal on a bounded queue
            pending.queued = False
            self._queue.remove(pending)
            self._queued_items -= len(pending.inputs)
            self._notify_depth()

    def _expire(self, pending: _Pending) -> None:
        pending.timer = None
        if pending.future.done():
            return
        pending.future.set_exception(DeadlineExceeded("request deadline passed before it ran"))
        self._forget(pending)

    def _maybe_dispatch(self) -> None:
        # An inline check pending dispatches what is queued at the end of the pass; with every
        # slot busy, the next finishing batch dispatches.
        if self._inline_check is not None or not self._free_slots:
            return
        while self._queue:
            now = time.monotonic()
            delay = dispatch_delay(
                self._queued_items,
                now - self._queue[0].enqueued_at,
                self._free_slots > 0,
                self.max_batch_size,
                self._max_queue_delay_s,
            )
            if delay is None:
                return
            if delay > 0:
                self._arm_delay_timer(delay)
                return
            if self._may_run_inline():
                # Decide after this pass of the loop: others that arrived with it join its batch.
                assert self._loop is not None
                self._inline_check = self._loop.call_soon(self._dispatch_inline)
                return
            self._dispatch(now)

    @property
    def single_runs_inline(self) -> bool:
        """Whether a lone request's batch of one is short enough to run on the event loop."""
        return self._single_s is not None and self._single_s <= self._inline_max_s

    def _may_run_inline(self) -> bool:
        return (
            self._queued_items == 1
            and not self._running
            and self.single_runs_inline
            and (self._inline_when is None or self._inline_when())
        )

    def _dispatch_inline(self) -> None:
        self._inline_check = None
        if not self._may_run_inline():  # more arrived, or it went: the usual path
            self._maybe_dispatch()
            return
        now = time.monotonic()
        batch = self._take()
        if not batch:
            return
        self._batch_started(batch, now)
        try:
            outputs, inference_s = _timed_call(self._run_inline, batch[0].inputs)
        except Exception as exc:
            self._complete(batch, now, exc=exc)
        else:
            self._complete(batch, now, outputs=outputs, inference_s=inference_s)

    def _arm_delay_timer(self, delay: float) -> None:
        if self._delay_timer is None and self._loop is not None:
            self._delay_timer = self._loop.call_later(delay, self._on_delay_timer)

    def _on_delay_timer(self) -> None:
        self._delay_timer = None
        self._maybe_dispatch()

    def _dispatch(self, now: float) -> None:
        batch = self._take()
        if not batch:  # every candidate had gone
            return
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([p.inputs for p in batch])
        self._batch_started(batch, now)
        self._free_slots -= 1
        assert self._loop is not None
        future = self._loop.run_in_executor(self._executor, _timed_call, self._run_batch, inputs)
        self._running.add(future)
        future.add_done_callback(lambda done: self._finish(done, batch, now))

    def _batch_started(self, batch: list[_Pending], now: float) -> None:
        if self._observer is not None:
            size = sum([len(p.inputs) for p in batch])
            self._observer.batch_started(size, [now - p.enqueued_at for p in batch])
        self._notify_depth()

    def _take(self) -> list[_Pending]:
        """Pop the head-of-queue requests that fit in one batch; drop those whose client went."""
        queue = self._queue
        head = list(islice(queue, self.max_batch_size))
        gone = [p for p in head if p.client_gone is not None and p.client_gone()]
        if gone:  # rare: O(n) removal each
            for pending in gone:
                self.cancel(pending, ClientGone())
            head = list(islice(queue, self.max_batch_size))
        batch = head[: batch_take([len(p.inputs) for p in head], self.max_batch_size)]
        items = 0
        for pending in batch:
            queue.popleft()
            pending.queued = False
            items += len(pending.inputs)
        self._queued_items -= items
        return batch

    def _finish(
        self,
        done: asyncio.Future[tuple[np.ndarray, float]],
        batch: list[_Pending],
        dispatched_at: float,
    ) -> None:
        self._running.discard(done)
        self._free_slots += 1
        try:
            outputs, inference_s = done.result()
        except BaseException as exc:
            self._complete(batch, dispatched_at, exc=exc)
        else:
            self._complete(batch, dispatched_at, outputs=outputs, inference_s=inference_s)

    def _complete(
        self,
        batch: list[_Pending],
        dispatched_at: float,
        *,
        outputs: np.ndarray | None = None,
        inference_s: float = 0.0,
        exc: BaseException | None = None,
    ) -> None:
        if exc is not None:  # every request of a failed batch gets an answer
            for pending in batch:
                self._settle(pending, None, exc)
        else:
            assert outputs is not None
            if len(outputs) == 1:
                self._single_s = inference_s
            self.drain_rate.completed(len(outputs), dispatched_at, time.monotonic())
            if self._observer is not None:
                self._observer.batch_finished(len(outputs), inference_s)
            start, size = 0, len(outputs)
            for pending in batch:
                stop = start + len(pending.inputs)
                queue_s = dispatched_at - pending.enqueued_at
                self._settle(pending, BatchResult(outputs[start:stop], queue_s, inference_s, size))
                start = stop
        self._maybe_dispatch()

    @overload
    def _settle(self, pending: _Pending, result: BatchResult) -> None: ...
    @overload
    def _settle(self, pending: _Pending, result: None, exc: BaseException) -> None: ...
    def _settle(self, pending: _Pending, result: Any, exc: BaseException | None = None) -> None:
        # `result` is a BatchResult exactly when `exc` is None (the overloads say so)
        timer = pending.timer
        if timer is not None:
            timer.cancel()
            pending.timer = None
        future = pending.future
        if future.done():  # expired or cancelled while running: its answer is discarded
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    def _notify_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._queued_items)


def _timed_call(run_batch: BatchFn, inputs: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    outputs = run_batch(inputs)
    return outputs, time.perf_counter() - start
