"""Logits -> the top classes with probabilities, one request at a time."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 for stable scores."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """The `k` most likely classes of one image's logits, best first (ties: lower index)."""
    probabilities = softmax(logits)
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"label": labels[i], "index": int(i), "score": float(probabilities[i])}
        for i in best.tolist()
    ]
