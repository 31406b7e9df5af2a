"""top_k against the plain definition (bench/top_k_cost.py: sort_everything): a full stable
sort and a float64 softmax of every class.

The service ranks 1000-class outputs with a partial sort; these properties hold it to exactly
the answer (order, ties, scores bit for bit) of sorting everything, for small and large outputs,
logits and probabilities, NaN and infinities included.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.postprocess import SMALL_OUTPUT, top_indices, top_k
from bench.top_k_cost import sort_everything

# few distinct values, so that ties are common; the rare ones test what no model should send
VALUES = st.sampled_from([-3.5, -1.0, 0.0, 0.25, 0.25, 2.0, 7.0, float("inf"), float("nan")])
OUTPUTS = st.integers(1, 1500).flatmap(
    lambda size: hnp.arrays(np.float32, size, elements=VALUES | st.floats(-50, 50, width=32))
)


def answered(
    logits: np.ndarray, k: int, probabilities: bool = False, rank=top_k
) -> list[tuple[int, float]]:
    labels = [f"class {i}" for i in range(len(logits))]
    rows = rank(logits, k, labels, probabilities=probabilities)
    assert all(row["label"] == labels[row["index"]] for row in rows)
    return [(row["index"], row["score"]) for row in rows]


def same(a: list[tuple[int, float]], b: list[tuple[int, float]], exact: bool) -> bool:
    """Same classes in the same order, and the same scores: bit for bit where `exact`, else to
    the last few bits (a sum in Python and numpy's pairwise sum round differently)."""
    return [i for i, _ in a] == [i for i, _ in b] and all(
        x == y or (x != x and y != y) or (not exact and math.isclose(x, y, rel_tol=1e-12))
        for (_, x), (_, y) in zip(a, b, strict=True)
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(OUTPUTS, st.data())
def test_top_indices_ranks_as_a_full_stable_sort(values, data):
    k = data.draw(st.integers(1, len(values)))
    assert top_indices(values, k) == np.argsort(-values, kind="stable")[:k].tolist()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(OUTPUTS, st.data(), st.booleans())
def test_top_k_answers_what_sorting_every_class_answers(logits, data, probabilities):
    k = data.draw(st.integers(1, len(logits)))
    python_path = len(logits) <= SMALL_OUTPUT and not probabilities
    if python_path and not np.isfinite(logits).all():
        return  # small logits take the pure-Python path, whose arithmetic differs on inf/NaN
    with np.errstate(all="ignore"):  # inf - inf: the same NaN both ways, and a warning each
        got = answered(logits, k, probabilities)
        expected = answered(logits, k, probabilities, rank=sort_everything)
    assert same(got, expected, exact=not python_path)


def test_a_thousand_classes_with_ties_keep_index_order():
    logits = np.zeros(1000, np.float32)
    logits[[10, 500, 999]] = 3.0
    logits[[7, 8]] = 5.0
    assert [index for index, _ in answered(logits, 5)] == [7, 8, 10, 500, 999]
