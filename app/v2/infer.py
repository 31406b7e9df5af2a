"""One V2 inference request through the micro-batcher that /classify uses.

A client batch of N images is enqueued as blocks of at most `max_batch_size` images, so it
never exceeds what the engine was warmed up for; the blocks' rows are put back in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.types import Receive

from app.batching import BatchResult, MicroBatcher
from app.disconnect import as_reason, disconnect_probe, wait_all
from app.errors import BlinkError
from app.service import ModelService
from app.v2.codec import encode_response, parse_request
from app.v2.errors import V2Error
from app.v2.model import ServedModel
from app.v2.stats import StageTimes

if TYPE_CHECKING:
    from app.batching import _Pending


@dataclass(slots=True)
class Answer:
    body: bytes
    header_length: int | None  # set when binary tensors follow the JSON header
    images: int
    times: StageTimes
    results: list[BatchResult]


async def infer(
    service: ModelService,
    model: ServedModel,
    body: bytes,
    header_length: int | None,
    arrival: float,
    receive: Receive,
    allowed_s: float,
) -> Answer:
    """Parse, decode, batch, postprocess and encode; `arrival` is on time.monotonic().

    `allowed_s` is the time the server and the request's header allow from arrival;
    `parameters.timeout` may shorten it further.
    """
    started = time.perf_counter()
    request = parse_request(body, header_length)
    conformal = model.conformal(request.parameters)  # refused here, before any work
    requested = model.requested(request.outputs, request.binary_output, conformal)
    deadline = arrival + timeout_s(request.parameters, allowed_s)
    source = model.read_input(request.inputs)
    pixels = source if isinstance(source, np.ndarray) else await decode_all(service, source)
    times = StageTimes(compute_input=time.perf_counter() - started)
    results = await run_blocks(service, pixels, deadline, receive)
    finished = time.perf_counter()
    if len(results) == 1:
        logits = results[0].outputs
    else:
        logits = np.concatenate([r.outputs for r in results])
    service.answered.append(logits)
    shadow = service.shadow
    if shadow is not None and len(results) == 1 and shadow.same_input:
        shadow.offer(service, pixels, None, results[0])
    header = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        header["id"] = request.id
    encoded, header_length = encode_response(header, model.outputs(logits, requested, conformal))
    times.queue = max(r.queue_s for r in results)
    times.compute_infer = sum(r.inference_s for r in results)
    times.compute_output = time.perf_counter() - finished
    return Answer(encoded, header_length, len(pixels), times, results)


def timeout_s(parameters: dict[str, Any], server_timeout_s: float) -> float:
    """`parameters.timeout` (microseconds, as Triton's clients send it), within the server's."""
    timeout = parameters.get("timeout")
    if timeout is None or timeout == 0:  # 0: no timeout of its own, as in Triton
        return server_timeout_s
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise V2Error(400, "parameters.timeout must be a non-negative integer (microseconds)")
    return min(timeout / 1e6, server_timeout_s)


async def decode_all(service: ModelService, images: list[bytes]) -> np.ndarray:
    if len(images) == 1:
        return await decode(service, 0, images[0])
    # Large images decode in the service's thread pool, so they can decode side by side.
    return np.concatenate(
        await asyncio.gather(*(decode(service, i, b) for i, b in enumerate(images)))
    )


async def decode(service: ModelService, index: int, data: bytes) -> np.ndarray:
    try:
        tensor, _ = await service.preprocess(data)
    except BlinkError as exc:
        raise V2Error.from_blink(exc, f"image {index}: ") from exc
    return tensor


async def run_blocks(
    service: ModelService, pixels: np.ndarray, deadline: float, receive: Receive
) -> list[BatchResult]:
    batcher = service.batcher
    probe = disconnect_probe(receive)
    capacity = service.settings.queue_capacity
    if len(pixels) > capacity:
        raise V2Error(400, f"{len(pixels)} images exceed the queue's capacity of {capacity}")
    service.admission.check(len(pixels), deadline - time.monotonic())
    step = batcher.max_batch_size
    pendings = []
    try:
        for start in range(0, len(pixels), step):
            pendings.append(service.submit(pixels[start : start + step], deadline, probe))
    except BaseException as exc:
        await drop(batcher, pendings, exc)
        raise
    return await wait_all(batcher, pendings, receive, probe)


async def drop(batcher: MicroBatcher, pendings: list[_Pending], exc: BaseException) -> None:
    """Take back blocks already queued, and collect their answers."""
    for pending in pendings:
        batcher.cancel(pending, as_reason(exc))
        with contextlib.suppress(Exception):
            await batcher.wait(pending)  # already answered: returns at once
