"""top_k against the plain definition (bench/top_k_cost.py: sort_everything): a full stable
sort and a float64 softmax of every class.

The service ranks 1000-class outputs with a partial sort; these properties hold it to exactly
the answer (order, ties, scores bit for bit) of sorting everything, for small and large outputs,
logits and probabilities, NaN and infinities included.

Calibrated scores (a temperature) and conformal prediction sets are held to their definitions
in numpy, and the serving rule to its coverage on held-out data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.postprocess import (
    SMALL_OUTPUT,
    calibrated_scores,
    prediction_set,
    prediction_set_indices,
    row_scores,
    top_indices,
    top_k,
)
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


# -- calibrated scores and prediction sets -----------------------------------------------------

FINITE = st.integers(1, 1500).flatmap(
    lambda size: hnp.arrays(np.float32, size, elements=st.floats(-30, 30, width=32))
)
TEMPERATURES = st.sampled_from([0.25, 0.5, 0.999, 1.0, 1.5, 3.0])


def definition(outputs: np.ndarray, temperature: float, probabilities: bool) -> np.ndarray:
    """softmax(logits / T), or p ** (1/T) renormalised, written out in float64; at T = 1 a
    model's probabilities are answered as they are."""
    values = outputs.astype(np.float64)
    if probabilities and temperature == 1.0:
        return values
    if probabilities:
        powered = values ** (1 / temperature)
        return powered / powered.sum()
    exp = np.exp(values / temperature - (values / temperature).max())
    return exp / exp.sum()


def as_probabilities(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max())
    return (exp / exp.sum()).astype(np.float32)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(FINITE, TEMPERATURES, st.booleans(), st.data())
def test_top_k_answers_the_tempered_softmax(logits, temperature, probabilities, data):
    outputs = as_probabilities(logits) if probabilities else logits
    k = data.draw(st.integers(1, len(outputs)))
    want = definition(outputs, temperature, probabilities)
    got = answered(outputs, k, probabilities, rank=_tempered(temperature))
    assert [score for _, score in got] == pytest.approx(want[[i for i, _ in got]], rel=1e-9)
    # best first: no class left out scores more than the last one answered
    left_out = np.delete(want, [i for i, _ in got])
    assert left_out.size == 0 or left_out.max() <= got[-1][1] * (1 + 1e-9)


def _tempered(temperature: float):
    def rank(logits, k, labels, *, probabilities=False):
        return top_k(logits, k, labels, probabilities=probabilities, temperature=temperature)

    return rank


@settings(max_examples=200, deadline=None, derandomize=True)
@given(FINITE, TEMPERATURES, st.booleans())
def test_row_scores_are_the_scores_top_k_answers_bit_for_bit(logits, temperature, probabilities):
    outputs = as_probabilities(logits) if probabilities else logits
    labels = [str(i) for i in range(len(outputs))]
    everything = top_k(
        outputs, len(outputs), labels, probabilities=probabilities, temperature=temperature
    )
    scores = row_scores(outputs, probabilities=probabilities, temperature=temperature)
    assert [row["score"] for row in everything] == scores[
        [row["index"] for row in everything]
    ].tolist()
    batch = calibrated_scores(outputs[None], probabilities=probabilities, temperature=temperature)
    np.testing.assert_allclose(batch[0], scores, rtol=1e-12)


def test_temperature_one_is_the_plain_answer():
    logits = np.random.default_rng(0).normal(0, 3, (2, 1000)).astype(np.float32)
    labels = [str(i) for i in range(1000)]
    for row in (logits[0][:10], logits[1]):
        assert top_k(row, 5, labels, temperature=1.0) == top_k(row, 5, labels)
    probabilities = np.stack([as_probabilities(row) for row in logits])
    assert calibrated_scores(probabilities, probabilities=True).tolist() == probabilities.tolist()


def test_zero_probabilities_stay_zero_under_a_temperature():
    p = np.array([0.0, 0.2, 0.8, 0.0], np.float32)
    scores = row_scores(p, probabilities=True, temperature=0.5)
    assert scores[0] == scores[3] == 0.0
    assert scores[1:3] == pytest.approx([0.04 / 0.68, 0.64 / 0.68], rel=1e-6)


SCORES = st.integers(1, 80).flatmap(
    lambda size: hnp.arrays(
        np.float64, size, elements=st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5]) | st.floats(0, 1)
    )
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(SCORES, st.floats(0, 1))
def test_a_set_is_every_class_reaching_the_threshold_or_the_top_one(scores, threshold):
    members = prediction_set_indices(scores, threshold)
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    reaching = [i for i in ranked if scores[i] >= threshold]
    assert members == (reaching or ranked[:1])  # best first, ties by index, never empty


def test_prediction_set_answer_shape():
    logits = np.array([2.0, 0.0, 2.0, -1.0], np.float32)
    labels = ["a", "b", "c", "d"]
    answer = prediction_set(logits, 0.9, 0.3, labels)
    assert answer == {
        "coverage": 0.9,
        "labels": ["a", "c"],  # equal scores: lower index first
        "indices": [0, 2],
        "scores": row_scores(logits)[[0, 2]].tolist(),
    }
    alone = prediction_set(logits, 0.5, 0.9, labels)
    assert (alone["labels"], alone["indices"]) == (["a"], [0])  # none reaches 0.9


def split_conformal_threshold(true_scores: np.ndarray, coverage: float) -> float:
    """The score threshold of split conformal prediction: 1 - the ceil((n + 1) c) / n empirical
    quantile of the nonconformity 1 - p_true (the build fits it; this is the test's own)."""
    n = len(true_scores)
    rank = math.ceil((n + 1) * coverage)  # 1-based; at most n for the sizes used here
    return float(1 - np.sort(1 - true_scores)[rank - 1])


@pytest.mark.parametrize("seed", [0, 1])
def test_sets_cover_held_out_images_at_the_nominal_rate(seed):
    """Synthetic logits whose tempered softmax is calibrated by construction (labels drawn from
    it), thresholds fitted on one half, the serving rule judged on the other half."""
    rng = np.random.default_rng(seed)
    images, classes, temperature = 20_000, 10, 1.7
    logits = rng.normal(0, 6, (images, classes)).astype(np.float32)
    probabilities = definition_batch(logits, temperature)
    truth = (probabilities.cumsum(axis=1) > rng.random((images, 1))).argmax(axis=1)
    half = images // 2
    labels = [f"c{i}" for i in range(classes)]
    for coverage in (0.9, 0.95, 0.99):
        threshold = split_conformal_threshold(
            probabilities[np.arange(half), truth[:half]], coverage
        )
        sets = [
            prediction_set(row, coverage, threshold, labels, temperature=temperature)["indices"]
            for row in logits[half:]
        ]
        covered = np.mean([y in s for y, s in zip(truth[half:], sets, strict=True)])
        size = np.mean([len(s) for s in sets])
        # at the level (the finite-sample guarantee, within sampling error of 10,000 images),
        # and not by answering every label
        assert coverage - 0.015 <= covered <= coverage + 0.015, (coverage, covered)
        assert size < classes / 2, (coverage, size)


def definition_batch(logits: np.ndarray, temperature: float) -> np.ndarray:
    tempered = logits.astype(np.float64) / temperature
    exp = np.exp(tempered - tempered.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
