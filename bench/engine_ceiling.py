"""The engine ceiling without HTTP: decode + session.run + postprocess, pinned to one core.

Prints JSON: images per second at batch 1 and batch 32, and the single-image time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from app.bundle import load_bundle
from app.engine import Engine
from app.postprocess import top_k
from app.preprocess import Preprocessor


def images_per_second(engine, preprocess, labels, bodies, batch, seconds) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [bodies[(done + i) % len(bodies)] for i in range(batch)]
        tensor = np.concatenate([preprocess(b) for b in chunk])
        for row in engine.run(tensor):
            top_k(row, 5, labels)
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bodies", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    engine = Engine(bundle, device="cpu", threads=1, max_batch_size=32)
    engine.warm_up()
    preprocess = Preprocessor(bundle.manifest.input)
    bodies = [p.read_bytes() for p in sorted(args.bodies.glob("*.bin"))]
    result = {"variant": engine.variant, "cpu": sorted(os.sched_getaffinity(0))}
    for batch in (1, 32):
        runs = [
            images_per_second(
                engine, preprocess, bundle.manifest.labels, bodies, batch, args.seconds
            )
            for _ in range(args.repeat)
        ]
        result[f"b{batch}"] = {
            "median": statistics.median(runs),
            "min": min(runs),
            "max": max(runs),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
