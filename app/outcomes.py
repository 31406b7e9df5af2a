"""What happened to a request, once: its status, error code and rejection reason, and the
bookkeeping every hot route shares (in-flight count, refusals, catch-all, metrics, access log).

/classify and V2 infer differ only in their success path and in the shape of an error body;
`serve_request` runs a route's handler and owns everything else. The success path pays for the
handler's call and nothing more: the mapping below runs only when the handler raises.

| outcome | status | `blink_rejections` reason |
|---|---|---|
| answered | 200 | - |
| refused for load | 503 (429 by setting) | queue_full, concurrency, deadline_unmeetable |
| not ready | 503 | not_ready |
| deadline passed (in the queue, or before it) | 504 | deadline |
| client gone before its answer | 499, nothing sent | disconnected |
| cancelled (shutdown; a disconnect where the server cancels) | 499, nothing sent | cancelled |
| a bad request | its 4xx | - |
| a bug | 500 | - |
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from app.admission import hold_connection
from app.asgi import Headers, send_response
from app.batching import ClientGone
from app.errors import BlinkError, DeadlineExceeded, NotReady, Overloaded

if TYPE_CHECKING:
    from app.service import ModelService

log = logging.getLogger("blink.requests")

CLIENT_CLOSED = 499  # nginx's "client closed request": counted, never sent
JSON = b"application/json"
REQUEST_ID_PREFIX = os.urandom(4).hex().encode()
REQUEST_COUNTER = itertools.count()


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    code: str
    reason: str | None = None  # the `blink_rejections` label; None: not a rejection counted here
    answered: bool = True  # False: nobody is there to read an answer


INTERNAL = Outcome(500, "internal")
CANCELLED = Outcome(CLIENT_CLOSED, "cancelled", "cancelled", answered=False)
DISCONNECTED = Outcome(CLIENT_CLOSED, "client_closed", "disconnected", answered=False)


def outcome_of(exc: BaseException, overload_status: int = 503) -> Outcome:
    """The one mapping from how a request ended to what is answered and counted."""
    if isinstance(exc, Overloaded):
        return Outcome(overload_status, exc.code, exc.reason)
    if isinstance(exc, NotReady):
        return Outcome(exc.status, exc.code, "not_ready")
    if isinstance(exc, DeadlineExceeded):
        return Outcome(exc.status, exc.code, "deadline")
    if isinstance(exc, BlinkError):
        return Outcome(exc.status, exc.code)
    if isinstance(exc, ClientGone):
        return DISCONNECTED
    if isinstance(exc, Exception):
        return INTERNAL
    return CANCELLED  # CancelledError, KeyboardInterrupt: the request did not finish


def new_request_id() -> bytes:
    """Unique across workers and restarts (a random per-process prefix), without a syscall."""
    return b"%s%08x" % (REQUEST_ID_PREFIX, next(REQUEST_COUNTER))


# A route's success path: it sends its 200 answer itself.
Handler = Callable[..., Awaitable[None]]
# A route's error answer: (status, body, extra headers) for an outcome and the exception behind
# it; the status is the outcome's unless the route's protocol says otherwise (V2 has no 422).
ErrorRenderer = Callable[[Outcome, BaseException], tuple[int, bytes, Headers]]


async def serve_request(
    route: str,
    handler: Handler,
    render_error: ErrorRenderer,
    service: ModelService,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Run `handler(service, scope, receive, send, headers, request_id, started)`, answer what
    it raises, and account for it. A route binds the first three with `functools.partial`,
    which costs no bytecode per call."""
    started = time.perf_counter()
    headers = dict(scope["headers"])  # lower-cased names; a repeated header keeps its last value
    request_id = (headers.get(b"x-request-id") or new_request_id())[:128]
    status = CLIENT_CLOSED  # until an answer has gone out: a cancellation leaves it so
    service.request_started()
    try:
        await handler(service, scope, receive, send, headers, request_id, started)
        status = 200
    except BaseException as exc:
        status = await refuse(service, exc, render_error, receive, send, request_id)
        if not isinstance(exc, Exception):
            raise
    finally:
        elapsed = time.perf_counter() - started
        service.request_finished()
        service.metrics.request_answered(route, status, elapsed)
        if service.settings.access_log:
            log.info(
                "request",
                extra={
                    "request_id": request_id.decode(errors="replace"),
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )


async def refuse(
    service: ModelService,
    exc: BaseException,
    render_error: ErrorRenderer,
    receive: Receive,
    send: Send,
    request_id: bytes,
) -> int:
    """Count and answer a request that did not succeed; returns its status."""
    outcome = outcome_of(exc, service.settings.overload_status)
    if outcome.reason is not None:
        service.metrics.rejected(outcome.reason)
    if outcome is INTERNAL:  # a bug, not the client's doing: answer 500 and keep serving
        log.exception("request failed", extra={"request_id": request_id.decode(errors="replace")})
    elif log.isEnabledFor(logging.DEBUG) and outcome.answered:
        log.debug(
            "rejected",
            extra={
                "request_id": request_id.decode(errors="replace"),
                "status": outcome.status,
                "reason": str(exc),
            },
        )
    if not outcome.answered:
        return outcome.status
    status, body, extra = render_error(outcome, exc)
    with contextlib.suppress(Exception):  # the answer may already have started
        await send_response(send, status, body, JSON, [(b"x-request-id", request_id), *extra])
    hold_s = getattr(exc, "hold_s", 0.0)
    if hold_s:
        hold_connection(receive, hold_s)
    return status
