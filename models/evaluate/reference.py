"""The reference behaviour a bundle records: how its answers are spread on held-out images.

The service compares a sliding window of its recent answers with it (the predicted-class mix,
the top-1 score histogram, the rate of low-confidence answers) to tell that what it is shown has
changed. Measured here on exactly the scores the service answers (`app.postprocess`).
"""

from __future__ import annotations

import numpy as np

from app.bundle import Reference
from app.postprocess import LOW_CONFIDENCE, SCORE_EDGES, calibrated_scores, score_bins


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
    histogram = np.bincount(score_bins(top, edges), minlength=len(edges) - 1) / len(top)
    return Reference(
        split=split,
        images=len(top),
        class_frequencies=[float(f) for f in classes],
        score_edges=list(SCORE_EDGES),
        score_frequencies=[float(f) for f in histogram],
        low_confidence_threshold=low_confidence,
        low_confidence_rate=float((top < low_confidence).mean()),
    )
