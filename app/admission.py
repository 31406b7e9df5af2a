"""Admission at arrival: refuse, before reading the body, what the service cannot serve in time.

Three limits, each named in the rejection: the batching queue is full (`queue_full`), too many
requests are in progress in this worker (`concurrency`, off unless `max_concurrency` is set),
and the request's deadline falls before the queue ahead of it can drain at the measured rate
(`deadline_unmeetable`). `Retry-After` is the time that queue needs to drain, in whole seconds.

A rejection is cheap but not free: a client that resends at once keeps the event loop busy
answering it. So after an overload answer the connection is not read for a while (where the
server exposes its flow control, as uvicorn does): the client's next request waits in the
kernel's socket buffer, TCP pushes back, and the core goes to the requests already accepted.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.batching import MicroBatcher
from app.drain import DrainRate, retry_after_s
from app.errors import (
    CONCURRENCY,
    DEADLINE_UNMEETABLE,
    QUEUE_FULL,
    DeadlineExceeded,
    InvalidParameter,
    NotReady,
    Overloaded,
)

if TYPE_CHECKING:
    from starlette.types import Receive

# Re-exported: admission is where the limits are decided and named.
__all__ = [
    "CONCURRENCY",
    "DEADLINE_UNMEETABLE",
    "QUEUE_FULL",
    "Admission",
    "DrainRate",
    "admission_refusal",
    "client_timeout_s",
    "hold_connection",
    "retry_after_s",
]

MIN_HOLD_S = 0.01
TIMEOUT_HEADER = b"x-request-timeout-ms"  # a client's own deadline, in milliseconds


def admission_refusal(
    *,
    items: int,
    queued: int,
    capacity: int,
    in_progress: int,
    max_concurrency: int,
    rate: float | None,
    time_left_s: float,
) -> str | None:
    """Which limit refuses `items` more (None: admit). `in_progress` includes this request.

    Pure, so the policy is tested without a server; `rate` is requests per second.
    """
    if queued + items > capacity:
        return QUEUE_FULL
    if max_concurrency and in_progress > max_concurrency:
        return CONCURRENCY
    if rate and (queued + items) / rate > time_left_s:
        return DEADLINE_UNMEETABLE
    return None


class Admission:
    """The live inputs of `admission_refusal`, and how long to hold a refused connection."""

    def __init__(
        self,
        batcher: MicroBatcher,
        in_progress: Callable[[], int],
        *,
        capacity: int,
        max_concurrency: int,
        hold_max_s: float,
    ) -> None:
        self._batcher = batcher
        self._in_progress = in_progress
        self._capacity = capacity
        self._max_concurrency = max_concurrency
        self._hold_max_s = hold_max_s
        self.ready = False  # set by the service once warmed up

    def check(self, items: int, time_left_s: float) -> None:
        """Raise if these items cannot be served: `NotReady`, `DeadlineExceeded` (already
        passed) or `Overloaded` (with its reason and Retry-After)."""
        # Every request pays for these lines: they admit the plain case without working out
        # reasons; anything else (including an opt-in concurrency limit) takes the long way.
        batcher = self._batcher
        ahead = batcher.queue_depth + items
        rate = batcher.drain_rate.per_second
        if (
            ahead <= self._capacity
            and self.ready
            and time_left_s > 0
            and (rate is None or ahead <= rate * time_left_s)
            and not self._max_concurrency
        ):
            return
        self._check_all(items, time_left_s)

    def _check_all(self, items: int, time_left_s: float) -> None:
        if not self.ready:
            raise NotReady("model is warming up")
        if time_left_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        queued = self._batcher.queue_depth
        rate = self._batcher.drain_rate.per_second
        reason = admission_refusal(
            items=items,
            queued=queued,
            capacity=self._capacity,
            in_progress=self._in_progress(),
            max_concurrency=self._max_concurrency,
            rate=rate,
            time_left_s=time_left_s,
        )
        if reason is not None:
            hold_s = self.hold_s(queued, rate)
            raise Overloaded.because(reason, retry_after_s(queued, rate), hold_s)

    def hold_s(self, queued: int, rate: float | None) -> float:
        """How long not to read a refused connection: about the time the queue needs to drain."""
        if not self._hold_max_s:
            return 0.0
        drain_s = queued / rate if rate else self._hold_max_s
        return min(self._hold_max_s, max(MIN_HOLD_S, drain_s))


def client_timeout_s(headers: dict[bytes, bytes], server_timeout_s: float) -> float:
    """The request's own deadline from `X-Request-Timeout-Ms`, never beyond the server's."""
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return server_timeout_s
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not 0 < ms < math.inf:
        text = value[:32].decode("latin-1")
        raise InvalidParameter(f"X-Request-Timeout-Ms must be a positive number, not {text!r}")
    return min(ms / 1000, server_timeout_s)


def hold_connection(receive: Receive, seconds: float) -> bool:
    """Stop reading the connection behind `receive` for `seconds` (uvicorn only; else False).

    Called after the answer has been sent, when uvicorn has just resumed reading for the next
    request: that request then waits in the socket buffer instead of costing the loop a parse
    and a rejection. Keep `seconds` below uvicorn's keep-alive timeout, which is still armed.
    """
    cycle = getattr(receive, "__self__", None)
    flow = getattr(cycle, "flow", None)
    transport = getattr(cycle, "transport", None)
    if seconds <= 0 or flow is None or transport is None or transport.is_closing():
        return False
    flow.pause_reading()
    asyncio.get_running_loop().call_later(seconds, _resume, flow, transport)
    return True


def _resume(flow: Any, transport: Any) -> None:
    if not transport.is_closing():
        flow.resume_reading()
