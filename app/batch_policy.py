"""The batcher's cap, chosen from the engine's measured cost curve.

Bigger batches are not always cheaper per image: on a CPU a real model's per-image cost can
rise once a batch's activations outgrow the caches, while on a GPU it keeps falling far out.
The engine times each batch size it warms up; the cap is the largest size whose per-image cost
is within a small tolerance of the cheapest one. Larger sizes win near-ties because under load
they raise throughput on accelerators and cost nothing where the curve is flat.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

BatchPolicy = Literal["measured", "max"]

# Near-ties within this fraction of the cheapest per-image cost go to the larger size; it also
# absorbs the timing noise of a short warm-up.
DEFAULT_TOLERANCE = 0.05


def per_image_costs(batch_costs: Mapping[int, float]) -> dict[int, float]:
    """Seconds per image at each batch size, from seconds per batch."""
    return {size: seconds / size for size, seconds in sorted(batch_costs.items())}


def best_batch_size(batch_costs: Mapping[int, float], tolerance: float = DEFAULT_TOLERANCE) -> int:
    """The largest batch size whose per-image cost is within `tolerance` of the cheapest."""
    if not batch_costs:
        raise ValueError("no batch sizes were timed")
    per_image = per_image_costs(batch_costs)
    cheapest = min(per_image.values())
    return max(size for size, cost in per_image.items() if cost <= cheapest * (1 + tolerance))


def batch_cap(policy: BatchPolicy, max_batch_size: int, batch_costs: Mapping[int, float]) -> int:
    """The batcher's cap: the measured choice (never above the setting), or the setting."""
    if policy == "max" or not batch_costs:
        return max_batch_size
    return min(max_batch_size, best_batch_size(batch_costs))
