"""Model outputs -> the top classes with probabilities, and conformal prediction sets.

Outputs are logits (a softmax turns them into probabilities) or, for models that end in a
softmax of their own (manifest output kind `probabilities`), the probabilities themselves.
A calibrated bundle (manifest `calibration`) also sets a temperature T: the served score is then
softmax(logits / T), or p ** (1/T) renormalised for probability outputs; T == 1 is the plain
softmax and costs nothing extra.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Up to this many classes, plain Python floats beat numpy's per-call overhead; beyond it numpy's
# vectorised path wins (bench/bytecodes.py and bench/run.py measure the request path).
SMALL_OUTPUT = 64
# Top-1 score bins of 0.05, in which a bundle's reference and the service's monitor count
# answers: fine enough to see confidence move, coarse enough for a window of a few hundred.
SCORE_EDGES = tuple(round(i * 0.05, 2) for i in range(21))
# Below this top-1 score a model gives its answer less than even odds.
LOW_CONFIDENCE = 0.5


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 for stable scores."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities


def tempered(outputs: np.ndarray, temperature: float, probabilities: bool) -> np.ndarray:
    """Logits whose plain softmax is the served score: logits / T, or log(p) / T (float64).

    softmax(log(p) / T) is p ** (1/T) renormalised, computed in log space so that small
    probabilities raised to a large power do not underflow to a sum of zero.
    """
    values = outputs.astype(np.float64)
    if probabilities:
        with np.errstate(divide="ignore"):  # log(0) = -inf: a score of exactly 0, as it was
            values = np.log(values)
    scaled: np.ndarray = values / temperature
    return scaled


def calibrated_scores(
    outputs: np.ndarray, temperature: float = 1.0, *, probabilities: bool = False
) -> np.ndarray:
    """The served scores over the last axis, in float64, a batch at a time (V2's
    `probabilities`, and the build, which fits and measures on exactly these scores)."""
    if temperature != 1.0:
        return softmax(tempered(outputs, temperature, probabilities))
    if probabilities:
        return outputs.astype(np.float64)
    return softmax(outputs)


def top_indices(values: np.ndarray, k: int) -> list[int]:
    """Indices of the `k` largest values, largest first; equal values in index order, NaN last.

    Ranks only what can reach the top: every value at least as large as the k-th (a partial
    sort), then a stable sort of those few. It runs on the event loop for every request, where
    a full sort of every class costs twice as much at 1000 classes (bench/top_k_cost.py).
    """
    size = len(values)
    if k < size:
        kth = np.partition(values, size - k)[size - k]
        candidates = np.flatnonzero(values >= kth)
        # fewer than k: NaNs sat among the largest (they partition as if above every number)
        if len(candidates) >= k:
            order = np.argsort(-values[candidates], kind="stable")[:k]
            best: list[int] = candidates[order].tolist()
            return best
    everything: list[int] = np.argsort(-values, kind="stable")[:k].tolist()
    return everything


def top_k(
    logits: np.ndarray,
    k: int,
    labels: list[str],
    *,
    probabilities: bool = False,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """The `k` most likely classes of one image's outputs, best first (ties: lower index).

    `probabilities`: the outputs are probabilities already; they are ranked and answered as
    they are, never put through a second softmax. `temperature`: the bundle's calibrated one.
    """
    if temperature != 1.0:  # the calibrated scores are the plain softmax of tempered logits
        logits, probabilities = tempered(logits, temperature, probabilities), False
    if probabilities:
        best = top_indices(logits, k)
        return [{"label": labels[i], "index": i, "score": float(logits[i])} for i in best]
    if len(logits) <= SMALL_OUTPUT:
        values = logits.tolist()
        peak = max(values)
        exps = [math.exp(v - peak) for v in values]
        total = sum(exps)
        scores = [e / total for e in exps]
        # sorted() is stable with reverse=True, so equal scores keep index order
        best = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
        return [{"label": labels[i], "index": i, "score": scores[i]} for i in best]
    # softmax's values for the k answered, without converting all of them to Python floats
    exp = np.exp(logits.astype(np.float64) - logits.max())
    total = exp.sum()
    return [
        {"label": labels[i], "index": i, "score": float(exp[i] / total)}
        for i in top_indices(logits, k)
    ]


def row_scores(
    logits: np.ndarray, *, probabilities: bool = False, temperature: float = 1.0
) -> np.ndarray:
    """Every class's served score for one image, bit for bit the scores `top_k` answers (the
    same arithmetic on the same path), so a prediction set never contradicts the predictions."""
    if temperature != 1.0:
        logits, probabilities = tempered(logits, temperature, probabilities), False
    if probabilities:
        return logits.astype(np.float64)
    if len(logits) <= SMALL_OUTPUT:
        values = logits.tolist()
        peak = max(values)
        exps = [math.exp(v - peak) for v in values]
        total = sum(exps)
        return np.array([e / total for e in exps], np.float64)
    exp = np.exp(logits.astype(np.float64) - logits.max())
    scores: np.ndarray = exp / exp.sum()
    return scores


def prediction_set_indices(scores: np.ndarray, threshold: float) -> list[int]:
    """The split-conformal prediction set: every class whose score reaches `threshold`, best
    first (ties: lower index); the top class alone when none does, so it is never empty."""
    members = np.flatnonzero(scores >= threshold)
    if len(members) == 0:
        return top_indices(scores, 1)
    order = np.argsort(-scores[members], kind="stable")
    chosen: list[int] = members[order].tolist()
    return chosen


def prediction_set(
    logits: np.ndarray,
    coverage: float,
    threshold: float,
    labels: list[str],
    *,
    probabilities: bool = False,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """One image's prediction set at `coverage`, whose recorded score threshold is `threshold`:
    `{"coverage", "labels", "indices", "scores"}`, the answer's `prediction_set`."""
    scores = row_scores(logits, probabilities=probabilities, temperature=temperature)
    members = prediction_set_indices(scores, threshold)
    return {
        "coverage": coverage,
        "labels": [labels[i] for i in members],
        "indices": members,
        "scores": scores[members].tolist(),
    }


def score_bins(top: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each top-1 score between `edges`; the last bin is closed on the right, so a
    score of exactly 1 counts."""
    return np.clip(np.searchsorted(edges, top, side="right") - 1, 0, len(edges) - 2)
