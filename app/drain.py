"""How fast the engine drains its queue, and what that means for a client told to retry.

The batcher measures it; admission and the overload answers read it. Below both, so that
admission depends on batching and never the other way round.
"""

from __future__ import annotations

import math

MAX_RETRY_AFTER_S = 60
# How much each completed batch moves the drain-rate estimate.
DRAIN_SMOOTHING = 0.1


class DrainRate:
    """Requests completed per second of engine occupancy, as an exponentially weighted mean.

    Each batch counts from the later of its dispatch and the previous batch's completion, so a
    busy engine's rate includes whatever else the core did between batches, and an idle gap
    does not count as slowness.
    """

    def __init__(self, smoothing: float = DRAIN_SMOOTHING) -> None:
        self._smoothing = smoothing
        self._items = 0.0
        self._seconds = 0.0
        self._last_done = -math.inf
        self.per_second: float | None = None  # None until a batch has completed

    def completed(self, items: int, dispatched_at: float, now: float) -> None:
        seconds = now - max(dispatched_at, self._last_done)
        self._last_done = now
        if seconds <= 0:
            return
        if self._seconds == 0.0:  # the first sample is the estimate
            self._items, self._seconds = float(items), seconds
        else:
            keep = 1 - self._smoothing
            self._items = keep * self._items + self._smoothing * items
            self._seconds = keep * self._seconds + self._smoothing * seconds
        self.per_second = self._items / self._seconds


def retry_after_s(queued: int, rate: float | None) -> int:
    """Whole seconds for `queued` requests to drain at `rate` (at least 1, at most 60)."""
    if not rate:
        return 1
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(queued / rate)))
