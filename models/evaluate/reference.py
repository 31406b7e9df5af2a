"""The reference behaviour a bundle records: how its answers are spread on held-out images.

The service compares a sliding window of its recent answers with it (the predicted-class mix,
the top-1 score histogram, the rate of low-confidence answers) to tell that what it is shown has
changed. Measured here on exactly the scores the service answers (`app.postprocess`).
"""

from __future__ import annotations

import numpy as np

from app.bundle import Reference
from app.postprocess import calibrated_scores

# Twenty bins of 0.05: fine enough to see confidence move, coarse enough that a window of a few
# hundred answers fills them.
SCORE_EDGES = tuple(round(i * 0.05, 2) for i in range(21))
# Below this top-1 score the model gives its answer less than even odds.
LOW_CONFIDENCE = 0.5


def reference_behaviour(
    outputs: np.ndarray,
    split: str,
    *,
    temperature: float = 1.0,
    probabilities: bool = False,
    low_confidence: float = LOW_CONFIDENCE,
) -> Reference:
    """The reference of the model's `outputs` ([N, classes], logits or probabilities) on a
    held-out split, scored as the service scores them."""
    scores = calibrated_scores(outputs, temperature, probabilities=probabilities)
    top = scores.max(axis=1)
    predicted = scores.argmax(axis=1)
    classes = np.bincount(predicted, minlength=scores.shape[1]) / len(predicted)
    edges = np.asarray(SCORE_EDGES)
    # the last bin is closed on the right, so a score of exactly 1 counts
    bins = np.clip(np.searchsorted(edges, top, side="right") - 1, 0, len(edges) - 2)
    histogram = np.bincount(bins, minlength=len(edges) - 1) / len(top)
    return Reference(
        split=split,
        images=len(top),
        class_frequencies=[float(f) for f in classes],
        score_edges=list(SCORE_EDGES),
        score_frequencies=[float(f) for f in histogram],
        low_confidence_threshold=low_confidence,
        low_confidence_rate=float((top < low_confidence).mean()),
    )
