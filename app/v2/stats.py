"""The statistics extension: per-stage counts and cumulative durations, in Triton's shape.

Fed by the V2 infer route, so it covers requests made through /v2 (per worker process).
As in Triton, every request is charged the whole compute time of the batches it rode in, and
`execution_count` / `batch_stats` count each engine batch once, at its full size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakValueDictionary

import numpy as np

from app.batching import BatchResult

STAGES = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += round(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class StageTimes:
    """Seconds one request spent in each stage."""

    compute_input: float = 0.0  # parse, decode and preprocess
    queue: float = 0.0  # until its last block started running
    compute_infer: float = 0.0  # the engine time of the batches it rode in
    compute_output: float = 0.0  # postprocess and encode


@dataclass
class ModelStatistics:
    stages: dict[str, Duration] = field(default_factory=lambda: {s: Duration() for s in STAGES})
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch_infer: dict[int, Duration] = field(default_factory=dict)  # batch size -> engine time
    # Rows of one engine batch are views of one output array: its identity names the batch.
    # Entries vanish once every request of that batch has dropped its rows.
    _batches_seen: WeakValueDictionary[int, np.ndarray] = field(default_factory=WeakValueDictionary)

    def record_success(
        self, images: int, total_s: float, times: StageTimes, results: Sequence[BatchResult]
    ) -> None:
        stages = self.stages
        stages["success"].add(total_s)
        stages["queue"].add(times.queue)
        stages["compute_input"].add(times.compute_input)
        stages["compute_infer"].add(times.compute_infer)
        stages["compute_output"].add(times.compute_output)
        self.inference_count += images
        self.last_inference_ms = int(time.time() * 1000)
        for result in results:
            self._count_batch(result)

    def record_failure(self, total_s: float) -> None:
        self.stages["fail"].add(total_s)

    def _count_batch(self, result: BatchResult) -> None:
        batch = result.outputs.base
        if batch is not None:
            if self._batches_seen.get(id(batch)) is batch:
                return  # another request of this batch already counted it
            self._batches_seen[id(batch)] = batch
        self.execution_count += 1
        self.batch_infer.setdefault(result.batch_size, Duration()).add(result.inference_s)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {stage: d.as_dict() for stage, d in self.stages.items()},
            "response_stats": {},
            "batch_stats": [
                # the batcher assembles and splits batches as one step: only engine time is timed
                {
                    "batch_size": size,
                    "compute_input": {"count": d.count, "ns": 0},
                    "compute_infer": d.as_dict(),
                    "compute_output": {"count": d.count, "ns": 0},
                }
                for size, d in sorted(self.batch_infer.items())
            ],
            "memory_usage": [],
        }
