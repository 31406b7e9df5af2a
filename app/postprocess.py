"""Model outputs -> the top classes with probabilities, one request at a time.

Outputs are logits (a softmax turns them into probabilities) or, for models that end in a
softmax of their own (manifest output kind `probabilities`), the probabilities themselves.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Up to this many classes, plain Python floats beat numpy's per-call overhead; beyond it numpy's
# vectorised path wins (bench/bytecodes.py and bench/run.py measure the request path).
SMALL_OUTPUT = 64


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 for stable scores."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities


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
    logits: np.ndarray, k: int, labels: list[str], *, probabilities: bool = False
) -> list[dict[str, Any]]:
    """The `k` most likely classes of one image's outputs, best first (ties: lower index).

    `probabilities`: the outputs are probabilities already; they are ranked and answered as
    they are, never put through a second softmax.
    """
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
