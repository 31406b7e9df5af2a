"""ONNX Runtime throughput of each variant on CPU, measured side by side in one run.

The machine is shared and noisy, so variants take turns round by round, and each variant's
figure is its best round: interference only ever slows a round down, never speeds it up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def throughput(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]],
    input_shape: tuple[int, int, int],
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    rounds: int = 5,
    images_per_round: int = 640,
    round_seconds: float | None = None,
) -> dict[str, dict[str, float]]:
    """{variant: {"batch1_images_per_s": ..., "batch1_latency_ms": ..., ...}}.

    `runners` map a variant to the function that runs a float32 NCHW batch, e.g. the service's
    `Engine.run`, so the figures are those of the service's own session settings.
    `round_seconds` caps a round of the slowest variant at about that time.
    """
    rng = np.random.default_rng(0)
    result: dict[str, dict[str, float]] = {name: {} for name in runners}
    for batch_size in batch_sizes:
        batch = rng.normal(0, 1, (batch_size, *input_shape)).astype(np.float32)
        runs = max(1, images_per_round // batch_size)
        best = {name: float("inf") for name in runners}
        slowest = 0.0
        for run in runners.values():  # warm-up: first runs allocate and pick kernels
            for _ in range(3):
                started = time.perf_counter()
                run(batch)
            slowest = max(slowest, time.perf_counter() - started)
        if round_seconds is not None:  # fewer runs for models too slow to run them all
            runs = max(1, min(runs, int(round_seconds / max(slowest, 1e-9))))
        for _ in range(rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                for _ in range(runs):
                    run(batch)
                best[name] = min(best[name], (time.perf_counter() - started) / runs)
        for name, seconds in best.items():
            result[name][f"batch{batch_size}_images_per_s"] = round(batch_size / seconds, 1)
            result[name][f"batch{batch_size}_latency_ms"] = round(seconds * 1000, 4)
    return result
