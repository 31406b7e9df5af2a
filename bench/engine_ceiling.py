"""The engine ceiling without HTTP: decode + session.run + postprocess, in one process.

Decoding runs in line, or (`--decode-threads N`) in a pool of N threads that decodes the next
batch while the engine runs this one, as the service's decode pool does.

Runs timed windows, one per batch size and repeat, and prints JSON: images per second per batch
size (median, min, max over the repeats), the batch cap the engine's warm-up curve chose, that
curve, and the single-image model time. `--batches` takes sizes and `cap` (the chosen cap).

With `--commands`, it warms up, prints those figures with `"ready": true`, and then answers
commands on stdin, one JSON line each, until stdin ends, so that a benchmark can measure the
engine between the service's windows:
- `window START SIZE SECONDS`: from time.time() START, batches of SIZE for SECONDS; prints
  `{"rate": images per second}`. Several processes given the same START measure the same
  window: their rates add up to the ceiling of that many workers.
- `lone SECONDS`: a lone request's work as the service does it on an idle service (decode on
  the calling thread, the lone-request session, top-5), one image after the other; prints
  `{"one_at_a_time_ms": the median}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app.batch_policy import batch_cap
from app.bundle import load_bundle
from app.engine import Engine
from app.postprocess import top_k
from app.preprocess import Preprocessor
from bench.run import spread


def images_in_window(
    engine, preprocess, labels, bodies, batch, until: float, pool, decode_threads: int = 0
) -> int:
    """Images decoded, run and answered before `until`. With a decode pool, the pool keeps
    decoding the batches ahead while the engine runs this one, as in the service under load."""
    done = 0
    if pool is None:
        while time.time() < until:
            chunk = [bodies[(done + i) % len(bodies)] for i in range(batch)]
            answer(engine, labels, np.concatenate([preprocess(b) for b in chunk]))
            done += batch
        return done
    ahead = batch + decode_threads  # enough queued that no decode thread waits
    decoding: deque = deque()
    submitted = 0
    while time.time() < until:
        while len(decoding) < batch + ahead:
            decoding.append(pool.submit(preprocess, bodies[submitted % len(bodies)]))
            submitted += 1
        answer(engine, labels, np.concatenate([decoding.popleft().result() for _ in range(batch)]))
        done += batch
    for future in decoding:
        future.cancel()
    return done


def one_at_a_time_ms(engine, preprocess, labels, bodies, seconds: float) -> float:
    """Median milliseconds of decode + lone-request run + top-5 for one image, back to back."""
    took: list[float] = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        started = time.perf_counter()
        (row,) = engine.run_lone(preprocess(bodies[len(took) % len(bodies)]))
        top_k(row, 5, labels)
        took.append(time.perf_counter() - started)
    return statistics.median(took) * 1000


def answer(engine, labels, tensor: np.ndarray) -> None:
    for row in engine.run(tensor):
        top_k(row, 5, labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bodies", type=Path, required=True)
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--no-lone-session", action="store_true", help="batch 1 alone runs in the batch session"
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--decode-threads", type=int, default=0, help="decode pool size; 0 = decode in line"
    )
    parser.add_argument("--batches", nargs="+", default=["1", "32"], help="sizes, or 'cap'")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--commands", action="store_true", help="answer commands on stdin")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    engine = Engine(
        bundle,
        device="cpu",
        variant=args.variant,
        threads=args.threads,
        spin_when_alone=not args.no_lone_session,
        max_batch_size=args.max_batch_size,
    )
    costs = engine.warm_up()
    # what a lone request's model costs (Engine.run_lone): batch 1, back to back, the fastest run
    lone_b1_s = engine.fastest_run_s(engine.run_lone, 1, 20, budget_s=1.0)
    cap = batch_cap("measured", args.max_batch_size, costs)
    preprocess = Preprocessor(bundle.manifest.input)
    labels = bundle.manifest.labels
    bodies = [p.read_bytes() for p in sorted(args.bodies.glob("*.bin"))]
    pool = ThreadPoolExecutor(args.decode_threads) if args.decode_threads else None
    result: dict = {
        "variant": engine.variant,
        "threads": args.threads,
        "decode_threads": args.decode_threads,
        "cpu": sorted(os.sched_getaffinity(0)),
        "cap": cap,
        "seconds_per_batch": costs,
        "model_b1_ms": costs[1] * 1000,
        "lone_b1_ms": lone_b1_s * 1000,
    }

    def window(opens: float, size: int, seconds: float) -> float:
        time.sleep(max(0.0, opens - time.time()))
        done = images_in_window(
            engine, preprocess, labels, bodies, size, opens + seconds, pool, args.decode_threads
        )
        return done / (time.time() - opens)

    if args.commands:
        one_at_a_time_ms(engine, preprocess, labels, bodies, 0.2)  # first decodes, first runs
        print(json.dumps({"ready": True, **result}), flush=True)
        for line in sys.stdin:
            command, *values = line.split()
            if command == "window":
                rate = window(float(values[0]), int(values[1]), float(values[2]))
                print(json.dumps({"rate": rate}), flush=True)
            elif command == "lone":
                took = one_at_a_time_ms(engine, preprocess, labels, bodies, float(values[0]))
                print(json.dumps({"one_at_a_time_ms": took}), flush=True)
            else:
                raise SystemExit(f"unknown command: {line.strip()}")
        return
    sizes = sorted({cap if b == "cap" else int(b) for b in args.batches})
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.repeat):
        for size in sizes:
            rates[size].append(window(time.time(), size, args.seconds))
    result["rates"] = rates
    for size, runs in rates.items():
        result[f"b{size}"] = spread(runs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
