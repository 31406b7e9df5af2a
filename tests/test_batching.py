"""The micro-batcher alone: its policy as pure functions, its plumbing with a gated engine."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from app.batching import ClientGone, MicroBatcher, batch_take, dispatch_delay
from app.errors import DeadlineExceeded, Overloaded


@pytest.mark.parametrize(
    ("queued", "age", "free", "max_batch", "delay", "expected"),
    [
        (0, 0.0, True, 8, 0.0, None),  # nothing queued
        (3, 0.0, False, 8, 0.0, None),  # engine busy: let the batch grow
        (1, 0.0, True, 8, 0.0, 0.0),  # lone request, no delay: go now
        (3, 0.001, True, 8, 0.005, 0.004),  # wait for the rest of the delay
        (8, 0.0, True, 8, 0.005, 0.0),  # full batch: no reason to wait
        (2, 0.006, True, 8, 0.005, 0.0),  # delay used up
    ],
)
def test_dispatch_delay(queued, age, free, max_batch, delay, expected):
    result = dispatch_delay(queued, age, free, max_batch, delay)
    assert result == pytest.approx(expected) if expected is not None else result is None


@pytest.mark.parametrize(
    ("sizes", "max_batch", "expected"),
    [
        ([1, 1, 1], 8, 3),
        ([1] * 10, 4, 4),
        ([3, 2], 4, 1),  # a block that would overflow waits for the next batch
        ([3, 1, 2], 4, 2),
        ([4], 4, 1),
        ([], 4, 0),
    ],
)
def test_batch_take(sizes, max_batch, expected):
    assert batch_take(sizes, max_batch) == expected


class GatedModel:
    """Doubles its input. While closed, every call blocks until `release()`; records batches."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[float]] = []
        self.fail = fail
        self._open = threading.Event()
        self._started = threading.Semaphore(0)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch[:, 0].tolist())
        self._started.release()
        self._open.wait(10)
        if self.fail:
            raise RuntimeError("engine failed")
        return batch * 2

    def open(self) -> GatedModel:
        self._open.set()
        return self

    def release(self) -> None:
        self._open.set()

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self._started.acquire, True, 10)


def item(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 1), value, np.float32)


def later(seconds: float = 10) -> float:
    return time.monotonic() + seconds


async def test_lone_request_runs_at_once_alone():
    model = GatedModel().open()
    batcher = MicroBatcher(model, max_batch_size=8)
    result = await batcher.run(item(3), later())
    assert result.outputs.tolist() == [[6.0]]
    assert result.batch_size == 1
    assert model.batches == [[3.0]]


async def test_requests_accumulate_while_the_engine_is_busy():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    first = batcher.submit(item(0), later())
    await model.wait_started()
    rest = [batcher.submit(item(v), later()) for v in (1, 2, 3)]
    assert batcher.queue_depth == 3
    model.release()
    results = [await batcher.wait(p) for p in (first, *rest)]
    assert model.batches == [[0.0], [1.0, 2.0, 3.0]]
    assert [r.outputs[0, 0] for r in results] == [0.0, 2.0, 4.0, 6.0]
    assert [r.batch_size for r in results] == [1, 3, 3, 3]


async def test_batches_never_exceed_max_batch_size():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=4)
    pending = [batcher.submit(item(0), later())]
    await model.wait_started()
    pending += [batcher.submit(item(v), later()) for v in range(1, 11)]
    model.release()
    await asyncio.gather(*(batcher.wait(p) for p in pending))
    assert [len(b) for b in model.batches] == [1, 4, 4, 2]


async def test_blocks_of_several_items_stay_together_and_split_back():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=4)
    busy = batcher.submit(item(0), later())
    await model.wait_started()
    block_a = batcher.submit(np.arange(3, dtype=np.float32)[:, None], later())
    block_b = batcher.submit(np.arange(10, 12, dtype=np.float32)[:, None], later())
    model.release()
    a, b = await batcher.wait(block_a), await batcher.wait(block_b)
    await batcher.wait(busy)
    assert a.outputs[:, 0].tolist() == [0.0, 2.0, 4.0]
    assert b.outputs[:, 0].tolist() == [20.0, 22.0]
    assert model.batches[1:] == [[0.0, 1.0, 2.0], [10.0, 11.0]]


async def test_full_queue_rejects_at_once():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8, queue_capacity=2)
    running = batcher.submit(item(0), later())
    await model.wait_started()
    queued = [batcher.submit(item(v), later()) for v in (1, 2)]
    with pytest.raises(Overloaded):
        batcher.submit(item(3), later())
    model.release()
    for p in (running, *queued):
        await batcher.wait(p)
    assert model.batches == [[0.0], [1.0, 2.0]]


async def test_expired_request_is_answered_and_never_run():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    running = batcher.submit(item(0), later())
    await model.wait_started()
    doomed = batcher.submit(item(7), time.monotonic() + 0.02)
    with pytest.raises(DeadlineExceeded):
        await batcher.wait(doomed)
    assert batcher.queue_depth == 0
    model.release()
    await batcher.wait(running)
    assert model.batches == [[0.0]]


async def test_cancelled_request_is_removed_and_never_run():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    running = batcher.submit(item(0), later())
    await model.wait_started()
    gone = batcher.submit(item(5), later())
    kept = batcher.submit(item(6), later())
    waiter = asyncio.ensure_future(batcher.wait(gone))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert batcher.queue_depth == 1
    model.release()
    await batcher.wait(running)
    await batcher.wait(kept)
    assert model.batches == [[0.0], [6.0]]


async def test_cancel_with_a_reason_answers_the_waiter():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    running = batcher.submit(item(0), later())
    await model.wait_started()
    gone = batcher.submit(item(5), later())
    batcher.cancel(gone, ClientGone())
    with pytest.raises(ClientGone):
        await batcher.wait(gone)
    model.release()
    await batcher.wait(running)
    assert model.batches == [[0.0]]


async def test_failed_batch_answers_every_request_and_the_batcher_goes_on():
    model = GatedModel(fail=True)
    batcher = MicroBatcher(model, max_batch_size=8)
    first = batcher.submit(item(0), later())
    await model.wait_started()
    others = [batcher.submit(item(v), later()) for v in (1, 2)]
    model.release()
    for p in (first, *others):
        with pytest.raises(RuntimeError, match="engine failed"):
            await batcher.wait(p)
    model.fail = False
    assert (await batcher.run(item(4), later())).outputs[0, 0] == 8.0


async def test_queue_delay_gathers_requests_into_one_batch():
    model = GatedModel().open()
    batcher = MicroBatcher(model, max_batch_size=8, max_queue_delay_s=0.05)
    pending = [batcher.submit(item(v), later()) for v in (1, 2, 3)]
    await asyncio.gather(*(batcher.wait(p) for p in pending))
    assert model.batches == [[1.0, 2.0, 3.0]]


async def test_queue_delay_is_cut_short_by_a_full_batch():
    model = GatedModel().open()
    batcher = MicroBatcher(model, max_batch_size=2, max_queue_delay_s=30)
    pending = [batcher.submit(item(v), later()) for v in (1, 2)]
    await asyncio.wait_for(asyncio.gather(*(batcher.wait(p) for p in pending)), 5)
    assert model.batches == [[1.0, 2.0]]


async def test_engine_slots_run_batches_concurrently():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=8, engine_slots=2)
    first = batcher.submit(item(1), later())
    second = batcher.submit(item(2), later())
    await model.wait_started()
    await model.wait_started()  # both started while neither has finished
    model.release()
    await batcher.wait(first)
    await batcher.wait(second)
    assert model.batches == [[1.0], [2.0]]


async def test_drain_waits_for_queued_and_running_requests():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=2)
    pending = [batcher.submit(item(v), later()) for v in range(5)]
    await model.wait_started()
    drained = asyncio.ensure_future(batcher.drain())
    model.release()
    await drained
    assert all(p.future.done() and not p.future.exception() for p in pending)


async def test_batched_results_equal_single_image_runs_bit_for_bit(bundle_dir):
    for variant in ("model.onnx", "model.int8.onnx"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(
            str(bundle_dir / variant), options, providers=["CPUExecutionProvider"]
        )

        def run(batch: np.ndarray, session=session) -> np.ndarray:
            return session.run(["logits"], {"input": batch})[0]

        gate = GatedModel()
        batcher = MicroBatcher(lambda b, gate=gate: (gate(b[:, :1, 0, 0]), run(b))[1])
        images = np.random.default_rng(0).normal(0, 1, (24, 1, 28, 28)).astype(np.float32)
        pending = [batcher.submit(images[:1], later())]
        await gate.wait_started()
        pending += [batcher.submit(images[i : i + 1], later()) for i in range(1, 24)]
        gate.release()
        results = [await batcher.wait(p) for p in pending]
        assert results[-1].batch_size == 23
        for i, result in enumerate(results):
            assert np.array_equal(result.outputs, run(images[i : i + 1])), (variant, i)


class ThreadRecorder:
    """Doubles its input and records the thread and the batch of every call."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.calls: list[tuple[int, list[float]]] = []
        self.seconds, self.fail = seconds, fail

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append((threading.get_ident(), batch[:, 0].tolist()))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("engine failed")
        return batch * 2


async def test_lone_request_runs_on_the_loop_once_a_batch_of_one_is_known_to_be_quick():
    model = ThreadRecorder()
    batcher = MicroBatcher(model, max_batch_size=8, inline_max_s=1.0)
    first = await batcher.run(item(1), later())  # measured on the engine thread
    second = await batcher.run(item(2), later())
    assert (first.outputs.tolist(), second.outputs.tolist()) == ([[2.0]], [[4.0]])
    loop_thread = threading.get_ident()
    assert [thread == loop_thread for thread, _ in model.calls] == [False, True]


async def test_an_inline_run_uses_the_inline_callable_and_batches_the_other():
    batches, lone = ThreadRecorder(), ThreadRecorder()
    batcher = MicroBatcher(batches, max_batch_size=8, inline_max_s=1.0, run_inline=lone)
    await batcher.run(item(1), later())  # measured on the engine thread
    await batcher.run(item(2), later())  # alone: inline
    pending = [batcher.submit(item(v), later()) for v in (3, 4)]
    assert [(await batcher.wait(p)).outputs[0, 0] for p in pending] == [6.0, 8.0]
    assert [values for _, values in batches.calls] == [[1.0], [3.0, 4.0]]
    assert lone.calls == [(threading.get_ident(), [2.0])]


async def test_requests_arriving_together_are_batched_on_the_engine_thread_not_run_inline():
    model = ThreadRecorder()
    batcher = MicroBatcher(model, max_batch_size=8, inline_max_s=1.0)
    await batcher.run(item(0), later())
    # submitted in one pass of the loop: the inline decision waits for the end of it
    pending = [batcher.submit(item(v), later()) for v in (1, 2, 3)]
    results = [await batcher.wait(p) for p in pending]
    assert [r.outputs[0, 0] for r in results] == [2.0, 4.0, 6.0]
    assert model.calls[1][1] == [1.0, 2.0, 3.0]
    assert model.calls[1][0] != threading.get_ident()


@pytest.mark.parametrize(
    ("inline_max_s", "engine_seconds", "inline_when"),
    [
        (0.0, 0.0, None),  # off
        (0.005, 0.02, None),  # a batch of one is too slow to hold the loop for
        (1.0, 0.0, lambda: False),  # the service says others are in progress
    ],
)
async def test_lone_request_stays_on_the_engine_thread(inline_max_s, engine_seconds, inline_when):
    model = ThreadRecorder(seconds=engine_seconds)
    batcher = MicroBatcher(
        model, max_batch_size=8, inline_max_s=inline_max_s, inline_when=inline_when
    )
    for value in (1, 2, 3):
        assert (await batcher.run(item(value), later())).outputs.tolist() == [[value * 2.0]]
    assert threading.get_ident() not in {thread for thread, _ in model.calls}


async def test_failed_inline_run_answers_the_request_and_the_batcher_goes_on():
    model = ThreadRecorder()
    batcher = MicroBatcher(model, max_batch_size=8, inline_max_s=1.0)
    await batcher.run(item(0), later())
    model.fail = True
    with pytest.raises(RuntimeError, match="engine failed"):
        await batcher.run(item(1), later())
    assert model.calls[-1][0] == threading.get_ident()
    model.fail = False
    assert (await batcher.run(item(2), later())).outputs.tolist() == [[4.0]]
    await batcher.drain()


async def test_inline_run_skips_a_client_that_went():
    model = ThreadRecorder()
    batcher = MicroBatcher(model, max_batch_size=8, inline_max_s=1.0)
    await batcher.run(item(0), later())
    gone = batcher.submit(item(9), later(), client_gone=lambda: True)
    with pytest.raises(ClientGone):
        await batcher.wait(gone)
    assert [values for _, values in model.calls] == [[0.0]]
