"""Dropping a gone client's request: uvicorn's cheap probe, and the watcher task elsewhere."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn

from app.batching import ClientGone, MicroBatcher
from app.disconnect import disconnect_probe, wait_all
from loadtest.processes import free_port
from tests.test_batching import GatedModel, item, later


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_uvicorn_offers_a_probe_that_turns_true_when_the_client_goes(http):
    seen: list[object] = []
    done = asyncio.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        probe = disconnect_probe(receive)
        seen.append(probe is not None and probe())
        for _ in range(500):  # the client closes without waiting for an answer
            if probe is None or probe():
                break
            await asyncio.sleep(0.01)
        seen.append(probe is not None and probe())
        done.set()

    port = free_port()
    config = uvicorn.Config(app, port=port, http=http, loop="none", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()
        while not seen:
            await asyncio.sleep(0.01)
        writer.close()
        await asyncio.wait_for(done.wait(), 10)
    finally:
        server.should_exit = True
        await serving
    assert seen == [False, True]


class NotACycle:
    disconnected = None  # an attribute of that name, but not a server's flag

    async def receive(self) -> dict:
        return {"type": "http.disconnect"}


def test_a_receive_without_a_cycle_has_no_probe():
    async def receive():
        return {"type": "http.disconnect"}

    assert disconnect_probe(receive) is None
    assert disconnect_probe(NotACycle().receive) is None


async def test_probe_drops_the_queued_request_when_its_batch_forms():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    running = batcher.submit(item(0), later())
    await model.wait_started()
    gone = False
    left = batcher.submit(item(5), later(), lambda: gone)
    stayed = batcher.submit(item(6), later(), lambda: False)
    gone = True
    model.release()
    await batcher.wait(running)
    with pytest.raises(ClientGone):
        await batcher.wait(left)
    assert (await batcher.wait(stayed)).outputs.tolist() == [[12.0]]
    assert model.batches == [[0.0], [6.0]]
    assert batcher.queue_depth == 0


async def test_probe_read_after_the_batch_turns_a_late_leave_into_client_gone():
    model = GatedModel().open()
    batcher = MicroBatcher(model, max_batch_size=8)
    gone = False

    def probe() -> bool:
        return gone

    pending = batcher.submit(item(1), later(), probe)
    gone = True  # leaves after its batch formed: it runs, but nobody reads the answer
    with pytest.raises(ClientGone):
        await wait_all(batcher, [pending], never_receive, probe)
    assert model.batches == [[1.0]]


async def never_receive() -> dict:
    await asyncio.Event().wait()
    return {}


async def test_without_a_probe_the_watcher_drops_every_block_when_receive_says_disconnect():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    running = batcher.submit(item(0), later())
    await model.wait_started()
    blocks = [batcher.submit(item(v), later()) for v in (1, 2)]
    leave = asyncio.Event()

    async def receive() -> dict:
        await leave.wait()
        return {"type": "http.disconnect"}

    waiting = asyncio.ensure_future(wait_all(batcher, blocks, receive, None))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    leave.set()
    with pytest.raises(ClientGone):
        await waiting
    assert batcher.queue_depth == 0
    model.release()
    await batcher.wait(running)
    assert model.batches == [[0.0]]
