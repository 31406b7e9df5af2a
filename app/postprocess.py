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


def top_k(
    logits: np.ndarray, k: int, labels: list[str], *, probabilities: bool = False
) -> list[dict[str, Any]]:
    """The `k` most likely classes of one image's outputs, best first (ties: lower index).

    `probabilities`: the outputs are probabilities already; they are ranked and answered as
    they are, never put through a second softmax.
    """
    if probabilities:
        scores = logits.tolist()
        best = np.argsort(-logits, kind="stable")[:k].tolist()
        return [{"label": labels[i], "index": i, "score": scores[i]} for i in best]
    if len(logits) <= SMALL_OUTPUT:
        values = logits.tolist()
        peak = max(values)
        exps = [math.exp(v - peak) for v in values]
        total = sum(exps)
        scores = [e / total for e in exps]
        # sorted() is stable with reverse=True, so equal scores keep index order
        best = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
    else:
        scores = softmax(logits).tolist()
        best = np.argsort(-logits, kind="stable")[:k].tolist()
    return [{"label": labels[i], "index": i, "score": scores[i]} for i in best]
