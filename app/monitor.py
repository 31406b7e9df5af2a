"""What a model answers, watched: predicted classes, top-1 scores, low-confidence answers, and
drift of a sliding window of recent answers against the bundle's reference behaviour.

The request path pays for one list append: each computed answer's output row is kept in
`answered`. About once a second the registry calls `flush`, on the event loop between requests,
which scores the rows as the service does (calibrated), counts them into the metrics and moves
the window. Answers from the response cache are not counted again: the window watches what the
model computes.

Drift is the Jensen-Shannon distance (base 2: 0 = the same mix, 1 = nothing in common) between
the window and the reference, for the predicted-class mix and for the top-1 score histogram.
With a reference of K classes, a window of n answers from the reference's own distribution
reads about sqrt((K - 1) / (4 n ln 2)) by sampling noise alone, so an alert also requires a
full enough window (`blink_drift_window_answers`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from app.postprocess import LOW_CONFIDENCE, SCORE_EDGES, calibrated_scores, score_bins

if TYPE_CHECKING:
    from app.bundle import Reference
    from app.metrics import ModelMetrics


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2, of two distributions over the same bins (0..1)."""
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        right = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(np.sqrt(max(0.0, (left + right) / 2)))


class PredictionMonitor:
    def __init__(
        self,
        metrics: ModelMetrics,
        labels: list[str],
        reference: Reference | None,
        *,
        temperature: float,
        probabilities: bool,
        window: int,
    ) -> None:
        self.answered: list[np.ndarray] = []  # output rows, [n, classes] each: the request path
        self._metrics = metrics
        self._labels = labels
        self._reference = reference
        self._temperature = temperature
        self._probabilities = probabilities
        # without a reference, the bins a reference would have
        edges = reference.score_edges if reference is not None else SCORE_EDGES
        self._edges = np.asarray(edges, dtype=np.float64)
        self.low_confidence = (
            reference.low_confidence_threshold if reference is not None else LOW_CONFIDENCE
        )
        self._classes: deque[int] = deque(maxlen=window)
        self._bins: deque[int] = deque(maxlen=window)
        self.class_drift: float | None = None
        self.confidence_drift: float | None = None
        if reference is not None:
            self._class_gauge, self._confidence_gauge, reference_low = metrics.drift_gauges()
            reference_low.set(reference.low_confidence_rate)

    @property
    def window_answers(self) -> int:
        return len(self._classes)

    def flush(self) -> None:
        """Count what was answered since the last flush, and measure the window's drift."""
        if not self.answered:
            return
        # The same list object stays (the service holds it), and a shadow's thread appends to
        # its own: take what is there now, by two steps that are each atomic.
        count = len(self.answered)
        rows = self.answered[:count]
        del self.answered[:count]
        outputs = rows[0] if len(rows) == 1 else np.concatenate(rows)
        scores = calibrated_scores(outputs, self._temperature, probabilities=self._probabilities)
        predicted = scores.argmax(axis=1)
        top = scores[np.arange(len(scores)), predicted]
        metrics = self._metrics
        for index, count in enumerate(np.bincount(predicted, minlength=len(self._labels))):
            if count:
                metrics.predicted(self._labels[index], int(count))
        metrics.top_score.observe_array(top)
        low = int((top < self.low_confidence).sum())
        if low:
            metrics.low_confidence.inc(low)
        bins = score_bins(top, self._edges)
        self._classes.extend(predicted.tolist())
        self._bins.extend(bins.tolist())
        metrics.window_answers.set(len(self._classes))
        if self._reference is not None:
            self._measure_drift(self._reference)

    def _measure_drift(self, reference: Reference) -> None:
        classes = np.bincount(np.fromiter(self._classes, int), minlength=len(self._labels))
        bins = np.bincount(np.fromiter(self._bins, int), minlength=len(self._edges) - 1)
        self.class_drift = js_distance(
            classes.astype(np.float64), np.asarray(reference.class_frequencies)
        )
        self.confidence_drift = js_distance(
            bins.astype(np.float64), np.asarray(reference.score_frequencies)
        )
        self._class_gauge.set(self.class_drift)
        self._confidence_gauge.set(self.confidence_drift)
