"""The build's side of calibrated scores (models/evaluate/calibration.py), on synthetic data
whose answer is known: a temperature recovered, conformal thresholds at their finite-sample
quantile, the calibration error, and prediction sets that cover what they promise.

The synthetic "model" draws logits z and labels from softmax(z / T0): the labels are exactly
as uncertain as softmax(z / T0) says, so T0 is the true temperature and any split of the
images is exchangeable with any other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.postprocess import prediction_set_indices, row_scores
from models.evaluate import calibration as calib


def sampled(count: int, temperature: float, seed: int, classes: int = 6):
    """(logits [count, classes], labels drawn from softmax(logits / temperature))."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (count, classes))
    scaled = logits / temperature
    probabilities = np.exp(scaled - scaled.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    cumulative = probabilities.cumsum(1)
    labels = (rng.random((count, 1)) > cumulative).sum(1)
    return logits.astype(np.float32), np.minimum(labels, classes - 1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_temperature: float) -> None:
    logits, labels = sampled(20_000, true_temperature, seed=1)
    fitted = calib.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.04)


def test_fit_temperature_stays_in_its_range() -> None:
    """Labels that contradict every logit: the fit stops at the range's top, not beyond."""
    logits = np.array([[10.0, -10.0]] * 50, np.float32)
    labels = np.ones(50, np.int64)
    high = calib.TEMPERATURE_RANGE[1]
    assert calib.fit_temperature(logits, labels) == pytest.approx(high, rel=1e-3)


def test_conformal_threshold_is_the_finite_sample_quantile() -> None:
    # true-class scores 0.05, 0.10, ..., 0.95: nonconformity 1 - s sorted 0.05 .. 0.95
    scores = np.arange(1, 20) / 20
    # n = 19, coverage 0.9: the ceil((19 + 1) * 0.9) = 18th smallest nonconformity, 0.90
    assert calib.conformal_threshold(scores, 0.9) == pytest.approx(0.10)
    # coverage 0.5: the 10th smallest, 0.50
    assert calib.conformal_threshold(scores, 0.5) == pytest.approx(0.50)
    # coverage 0.95: ceil(20 * 0.95) = 19, the largest nonconformity: every true score passes
    assert calib.conformal_threshold(scores, 0.95) == pytest.approx(0.05)
    for n in (10, 57, 200):
        rng = np.random.default_rng(n)
        true_scores = rng.random(n)
        for level in (0.8, 0.9):
            threshold = calib.conformal_threshold(true_scores, level)
            rank = math.ceil((n + 1) * level)
            assert (true_scores >= threshold).sum() >= rank  # at least k of n reach it
            assert threshold in true_scores  # one of the calibration scores, no interpolation


@pytest.mark.parametrize(
    ("level", "needed"), [(0.5, 1), (0.8, 4), (0.9, 9), (0.95, 19), (0.99, 99)]
)
def test_too_few_images_for_a_level(level: float, needed: int) -> None:
    assert calib.images_needed(level) == needed
    scores = np.linspace(0.1, 0.9, needed)
    calib.conformal_threshold(scores, level)  # exactly enough
    with pytest.raises(calib.TooFewImages, match=f"at least {needed} calibration images"):
        calib.conformal_threshold(scores[:-1], level)
    assert calib.supported_levels((0.5, 0.8, 0.9, 0.95, 0.99), needed)[-1] == level


def test_expected_calibration_error() -> None:
    # perfectly calibrated: in each confidence bin the accuracy is the confidence
    rows, labels = [], []
    for confidence, count in ((0.6, 500), (0.8, 250), (0.95, 200)):
        rows += [[confidence, 1 - confidence]] * count
        correct = round(confidence * count)
        labels += [0] * correct + [1] * (count - correct)
    scores, truth = np.array(rows), np.array(labels)
    assert calib.expected_calibration_error(scores, truth) == pytest.approx(0.0, abs=1e-9)
    # overconfident: 99% sure, right half the time
    sure = np.array([[0.99, 0.01]] * 400)
    coin = np.array([0, 1] * 200)
    assert calib.expected_calibration_error(sure, coin) == pytest.approx(0.49, abs=1e-6)
    bins = calib.reliability(scores, truth)
    assert [(round(c, 6), round(a, 6), n) for c, a, n in bins] == [
        (0.6, 0.6, 500),
        (0.8, 0.8, 250),
        (0.95, 0.95, 200),
    ]


def test_prediction_sets_cover_held_out_images() -> None:
    """Thresholds fitted on one part cover, on another, at least the level asked (up to the
    sampling error of a few thousand images), and the temperature makes scores honest."""
    true_temperature = 2.0
    logits, labels = sampled(9_000, true_temperature, seed=7)
    fit, conformal, test = (
        (logits[part], labels[part]) for part in np.split(np.arange(9_000), [2_000, 4_000])
    )
    levels = (0.5, 0.8, 0.9, 0.95)
    result = calib.calibrate(fit, conformal, test, levels, split="synthetic")
    assert result.temperature == pytest.approx(true_temperature, rel=0.08)
    assert result.images == 2_000 and result.split == "synthetic"
    assert set(result.thresholds) == {"0.5", "0.8", "0.9", "0.95"}
    # the plain softmax of these logits is overconfident; the calibrated scores are not
    assert result.ece_before is not None and result.ece_after is not None
    assert result.ece_before > 0.1 and result.ece_after < 0.03
    sizes = []
    for level in levels:
        key = str(level)
        assert result.coverage[key] >= level - 0.02, (level, result.coverage[key])
        if level >= 0.8:  # (below, the top label alone, never left out, covers more)
            assert result.coverage[key] <= level + 0.03  # not trivially every label
        # what the service would answer, image by image, gives the recorded figures
        sets = [
            prediction_set_indices(
                row_scores(row, temperature=result.temperature), result.thresholds[key]
            )
            for row in test[0]
        ]
        covered = np.mean([label in s for s, label in zip(sets, test[1], strict=True)])
        assert result.coverage[key] == round(float(covered), 6)
        assert result.mean_set_size[key] == round(float(np.mean([len(s) for s in sets])), 6)
        sizes.append(result.mean_set_size[key])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # more coverage, larger sets


def test_served_scores_are_the_service_rows() -> None:
    logits, _ = sampled(20, 1.0, seed=3)
    for temperature in (1.0, 0.7):
        scores = calib.served_scores(logits, temperature, False)
        for row, expected in zip(logits, scores, strict=True):
            assert row_scores(row, temperature=temperature).tolist() == expected.tolist()
    probabilities = calib.served_scores(logits, 1.0, False)
    sharpened = calib.served_scores(probabilities, 0.5, True)
    squared = probabilities**2
    np.testing.assert_allclose(sharpened, squared / squared.sum(1, keepdims=True), rtol=1e-9)


def test_stratified_parts_split_each_class_in_proportion() -> None:
    labels = np.array([0] * 100 + [1] * 40 + [2] * 10)
    first, second, rest = calib.stratified_parts(labels, (0.2, 0.3), seed=0)
    assert np.bincount(labels[first], minlength=3).tolist() == [20, 8, 2]
    assert np.bincount(labels[second], minlength=3).tolist() == [30, 12, 3]
    assert np.bincount(labels[rest], minlength=3).tolist() == [50, 20, 5]
    joined = np.concatenate([first, second, rest])
    assert sorted(joined.tolist()) == list(range(150))  # disjoint, nothing lost
    again = calib.stratified_parts(labels, (0.2, 0.3), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (first, second, rest), strict=True))
    other = calib.stratified_parts(labels, (0.2, 0.3), seed=1)
    assert not np.array_equal(other[0], first)


def test_levels_are_parsed_strictly() -> None:
    assert calib.parse_levels("0.95, 0.9,0.9") == (0.9, 0.95)
    for text, message in (("1.5", r"in \(0, 1\)"), ("0", r"in \(0, 1\)"), ("x", "not a number")):
        with pytest.raises(ValueError, match=message):
            calib.parse_levels(text)
    assert calib.supported_levels(calib.DEFAULT_COVERAGE, 20) == (0.9, 0.95)
    assert calib.supported_levels(calib.DEFAULT_COVERAGE, 8) == ()
