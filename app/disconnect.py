"""Dropping the requests of clients that went away, before they reach the engine.

ASGI tells an app about a disconnect only through a pending `receive()`, so the portable way
is a watcher task per request; under load that task is a noticeable share of the server's CPU
(bench/photos.py measures CPU per request). uvicorn's `receive` is a method of its per-request
cycle, whose `disconnected` flag turns true when the connection drops, so under uvicorn the
batcher reads that flag as each batch forms instead, and no task is needed. Other servers (and
in-process test clients) get the watcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.types import Receive

from app.batching import BatchResult, ClientGone, GoneProbe, MicroBatcher

if TYPE_CHECKING:
    from app.batching import _Pending


def disconnect_probe(receive: Receive) -> GoneProbe | None:
    """A check that reads true once the client has gone, where the server offers one."""
    cycle: Any = getattr(receive, "__self__", None)
    if type(getattr(cycle, "disconnected", None)) is not bool:
        return None
    return lambda: cycle.disconnected


async def wait_all(
    batcher: MicroBatcher,
    pendings: Sequence[_Pending],
    receive: Receive,
    probe: GoneProbe | None,
) -> list[BatchResult]:
    """Every request's result, in order. If the client goes, or one fails, the rest are dropped.

    `probe` is what the requests were submitted with: with one, the batcher drops them itself.
    """
    if probe is None:
        return await _wait_watching(batcher, pendings, receive)
    if len(pendings) == 1:  # the common case, without _wait's frame
        results = [await batcher.wait(pendings[0])]
    else:
        results = await _wait(batcher, pendings)
    if probe():  # it left while its batch ran: nobody reads this answer
        raise ClientGone()
    return results


async def _wait_watching(
    batcher: MicroBatcher, pendings: Sequence[_Pending], receive: Receive
) -> list[BatchResult]:
    watcher = asyncio.ensure_future(until_disconnect(receive))

    def on_disconnect(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            for pending in pendings:
                batcher.cancel(pending, ClientGone())

    watcher.add_done_callback(on_disconnect)
    try:
        return await _wait(batcher, pendings)
    finally:
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()


async def _wait(batcher: MicroBatcher, pendings: Sequence[_Pending]) -> list[BatchResult]:
    if len(pendings) == 1:
        return [await batcher.wait(pendings[0])]
    # gather collects the exceptions of the blocks cancelled below, so none goes unheard
    waiting = asyncio.gather(*(batcher.wait(p) for p in pendings))
    try:
        return list(await waiting)
    except BaseException as exc:
        for pending in pendings:
            batcher.cancel(pending, as_reason(exc))
        raise


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def as_reason(exc: BaseException) -> Exception:
    # a future cannot be failed with a CancelledError; the request is gone all the same
    return exc if isinstance(exc, Exception) else ClientGone()
