"""Scores that mean something: temperature scaling and split-conformal prediction sets.

The temperature is fitted on labelled images the network never trained on, by minimising the
negative log-likelihood of softmax(logits / T) (one parameter: it changes how sure the scores
are, never which class ranks first). The conformal thresholds come from another such split:
for a coverage level c, with n calibration images and their true classes' calibrated scores,
the threshold is the score below which at most a fraction 1 - c of exchangeable images' true
classes fall (the finite-sample quantile of split conformal prediction, "least ambiguous set"
scores). The service then answers, for that level, every label whose score reaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app.bundle import Calibration
from app.postprocess import prediction_set_indices, row_scores, tempered

DEFAULT_COVERAGE = (0.9, 0.95, 0.99)
ECE_BINS = 15
# the search range of the temperature; outside it a model is broken, not miscalibrated
TEMPERATURE_RANGE = (0.05, 20.0)


class TooFewImages(ValueError):
    """The calibration split cannot support a coverage level; the message says how many."""


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the mean negative log-likelihood of softmax(logits / T).

    The likelihood is convex in 1/T, so a golden-section search over log T converges to the
    one minimum; 60 steps narrow the range far below any difference a score could show.
    """
    logits = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        shifted = scaled - scaled.max(1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(1))
        return float(np.mean(log_z - shifted[rows, labels]))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return round(math.exp((low + high) / 2), 6)


def parse_levels(text: str) -> tuple[float, ...]:
    """'0.9,0.95' -> (0.9, 0.95); each level strictly between 0 and 1, or ValueError."""
    levels = set()
    for part in text.split(","):
        try:
            level = float(part)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number") from None
        if not 0 < level < 1:
            raise ValueError(f"coverage levels must be in (0, 1), not {part.strip()}")
        levels.add(level)
    return tuple(sorted(levels))


def images_needed(coverage: float) -> int:
    """The fewest calibration images for which the level's quantile is finite."""
    return math.ceil(coverage / (1 - coverage) - 1e-9)


def conformal_threshold(true_scores: np.ndarray, coverage: float) -> float:
    """The score threshold for `coverage` from the true classes' calibrated scores."""
    n = len(true_scores)
    rank = math.ceil((n + 1) * coverage - 1e-9)  # the k-th smallest nonconformity score
    if rank > n:
        raise TooFewImages(
            f"coverage {coverage} needs at least {images_needed(coverage)} calibration "
            f"images, the split holds {n}"
        )
    nonconformity = np.sort(1.0 - true_scores.astype(np.float64))
    return float(1.0 - nonconformity[rank - 1])


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray) -> float:
    """ECE over ECE_BINS equal-width bins of the top-1 score: how far, weighted by how many
    images fall in each bin, confidence is from accuracy."""
    confidence = scores.max(1)
    correct = scores.argmax(1) == labels
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    total = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return round(float(total), 6)


def reliability(scores: np.ndarray, labels: np.ndarray) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) per non-empty bin, for the reliability diagram."""
    confidence = scores.max(1)
    correct = scores.argmax(1) == labels
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    return [
        (float(confidence[bins == b].mean()), float(correct[bins == b].mean()), int(sum(bins == b)))
        for b in range(ECE_BINS)
        if (bins == b).any()
    ]


@dataclass
class SetFigures:
    coverage: float  # the fraction of images whose true label is in their set
    mean_size: float


def set_figures(scores: np.ndarray, labels: np.ndarray, threshold: float) -> SetFigures:
    """Coverage and mean size of the service's prediction sets at `threshold`."""
    sets = [prediction_set_indices(row, threshold) for row in scores]
    covered = [label in chosen for chosen, label in zip(sets, labels, strict=True)]
    return SetFigures(
        coverage=round(float(np.mean(covered)), 6),
        mean_size=round(float(np.mean([len(chosen) for chosen in sets])), 6),
    )


def calibrate(
    fit: tuple[np.ndarray, np.ndarray],
    conformal: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    levels: tuple[float, ...],
    *,
    split: str,
    probabilities: bool = False,
) -> Calibration:
    """The manifest's `calibration`: T from `fit` (logits, labels), thresholds from
    `conformal`, and the figures they give on `test`, all scored as the service scores."""
    temperature = fit_temperature(tempered(fit[0], 1.0, probabilities), fit[1])
    conformal_scores = served_scores(conformal[0], temperature, probabilities)
    true_scores = conformal_scores[np.arange(len(conformal[1])), conformal[1]]
    thresholds = {str(level): conformal_threshold(true_scores, level) for level in levels}
    test_scores = served_scores(test[0], temperature, probabilities)
    plain = served_scores(test[0], 1.0, probabilities)
    figures = {level: set_figures(test_scores, test[1], t) for level, t in thresholds.items()}
    return Calibration(
        temperature=temperature,
        thresholds=thresholds,
        split=split,
        images=len(conformal[1]),
        ece_before=expected_calibration_error(plain, test[1]),
        ece_after=expected_calibration_error(test_scores, test[1]),
        coverage={level: f.coverage for level, f in figures.items()},
        mean_set_size={level: f.mean_size for level, f in figures.items()},
    )


def served_scores(outputs: np.ndarray, temperature: float, probabilities: bool) -> np.ndarray:
    """[N, classes] scores, each row computed exactly as the service computes one answer's,
    so a threshold fitted here splits the service's scores where the report says it does."""
    return np.stack(
        [row_scores(row, probabilities=probabilities, temperature=temperature) for row in outputs]
    )


def stratified_parts(
    labels: np.ndarray, fractions: tuple[float, ...], seed: int
) -> list[np.ndarray]:
    """Indices split per class, seeded: one part per fraction, the rest last."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for part, fraction in enumerate(fractions):
            size = round(len(members) * fraction)
            parts[part] += members[start : start + size].tolist()
            start += size
        parts[-1] += members[start:].tolist()
    return [np.sort(np.asarray(part, np.int64)) for part in parts]


def supported_levels(levels: tuple[float, ...], images: int) -> tuple[float, ...]:
    """The levels a calibration split of `images` can support."""
    return tuple(level for level in levels if images_needed(level) <= images)
