"""The reference behaviour a bundle records (what drift is measured against): its arithmetic,
its validation in the manifest, and what /v1/models says of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.bundle import BundleError, Reference, load_bundle
from app.postprocess import calibrated_scores
from app.settings import Settings
from models.evaluate.reference import SCORE_EDGES, reference_behaviour
from tests.conftest import running_app
from tests.onnx_models import write_bundle


def test_class_mix_score_histogram_and_low_confidence_rate():
    logits = np.array(
        [
            [9.0, 0.0, 0.0],  # class 0, top-1 score ~1.0: the last bin
            [0.0, 9.0, 0.0],
            [0.0, 0.0, 0.1],  # class 2, barely: low confidence
            [0.0, 0.0, 9.0],
        ]
    )
    reference = reference_behaviour(logits, "test")
    assert reference.images == 4
    assert reference.class_frequencies == [0.25, 0.25, 0.5]
    top = calibrated_scores(logits).max(1)
    assert reference.low_confidence_rate == float((top < 0.5).mean()) == 0.25
    assert reference.score_edges == list(SCORE_EDGES)
    assert sum(reference.score_frequencies) == pytest.approx(1)
    assert reference.score_frequencies[-1] == 0.75  # three scores in [0.95, 1]
    low_bin = int(top[2] // 0.05)
    assert reference.score_frequencies[low_bin] == 0.25


def test_it_scores_as_the_service_does_temperature_and_probabilities():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5), size=200)
    plain = reference_behaviour(probabilities, "test", probabilities=True)
    assert plain.low_confidence_rate == float((probabilities.max(1) < 0.5).mean())
    hot = reference_behaviour(probabilities, "test", temperature=3.0, probabilities=True)
    assert hot.low_confidence_rate > plain.low_confidence_rate  # softer scores
    assert hot.class_frequencies == plain.class_frequencies  # the argmax does not move


def test_the_manifest_refuses_a_reference_that_does_not_fit(tmp_path):
    directory = write_bundle(tmp_path / "tiny" / "1")
    manifest = json.loads((directory / "manifest.json").read_text())
    good = reference_behaviour(np.eye(10), "test").model_dump()
    (directory / "manifest.json").write_text(json.dumps({**manifest, "reference": good}))
    assert load_bundle(directory).manifest.reference == Reference(**good)
    for broken, message in (
        ({**good, "class_frequencies": [1.0]}, "1 entries for 10 labels"),
        ({**good, "score_frequencies": [1.0]}, "one entry per bin"),
        ({**good, "class_frequencies": [0.5] * 10}, "sum to 1"),
    ):
        (directory / "manifest.json").write_text(json.dumps({**manifest, "reference": broken}))
        with pytest.raises(BundleError, match=message):
            load_bundle(directory)


async def test_v1_models_says_whether_a_reference_was_recorded(tmp_path, bundle_dir):
    directory = write_bundle(tmp_path / "ref" / "1", name="ref")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["reference"] = reference_behaviour(np.eye(10) * 5, "test split").model_dump()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    for model, recorded in ((directory, True), (bundle_dir, False)):
        async with running_app(Settings(model=model, threads=1)) as client:
            (served,) = (await client.get("/v1/models")).json()["models"]
        assert served["reference"]["recorded"] is recorded
        if recorded:
            assert served["reference"]["images"] == 10
            assert served["reference"]["class_frequencies"] == [0.1] * 10
        else:
            assert "no reference behaviour" in served["reference"]["summary"]
