"""The floor of this stack: the least a batching classify handler can do under uvicorn.

Decode with app.preprocess, queue, run batches of up to 32 on the same ONNX Runtime engine as
the service (one slot, in a worker thread), answer the top 5 as JSON. No metrics, deadlines,
validation, error handling, request ids or timing headers: what is left is what any Python
handler on uvicorn pays, so the service's distance to this app is the price of its features.

    BLINK_MODEL=<bundle> uvicorn bench.minimal_app:app --loop uvloop --http httptools
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson

from app.bundle import load_bundle
from app.engine import Engine
from app.postprocess import top_k
from app.preprocess import Preprocessor

MAX_BATCH = 32
bundle = load_bundle(Path(os.environ["BLINK_MODEL"]))
engine = Engine(bundle, device="cpu", threads=1, max_batch_size=MAX_BATCH)
engine.warm_up()
preprocess = Preprocessor(bundle.manifest.input)
labels = bundle.manifest.labels
executor = ThreadPoolExecutor(1)
queue: list[tuple[np.ndarray, asyncio.Future]] = []
busy = False


def dispatch() -> None:
    global busy
    if busy or not queue:
        return
    batch = queue[:MAX_BATCH]
    del queue[:MAX_BATCH]
    busy = True
    inputs = np.concatenate([tensor for tensor, _ in batch])
    running = asyncio.get_running_loop().run_in_executor(executor, engine.run, inputs)

    def finished(done: asyncio.Future) -> None:
        global busy
        busy = False
        for row, (_, waiter) in zip(done.result(), batch, strict=True):
            waiter.set_result(row)
        dispatch()

    running.add_done_callback(finished)


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] != "POST":  # the benchmark's readiness probe
        return await answer(send, b"{}")
    body = (await receive())["body"]  # the benchmark's bodies arrive in one message
    waiter = asyncio.get_running_loop().create_future()
    queue.append((preprocess(body), waiter))
    dispatch()
    await answer(send, orjson.dumps({"predictions": top_k(await waiter, 5, labels)}))


async def answer(send, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
