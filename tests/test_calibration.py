"""Calibrated scores and conformal prediction sets, over HTTP against real tiny bundles.

Every expected answer is computed here from the bundle's ONNX model run directly (its own
ONNX Runtime session on `app.preprocess` output) and numpy: the served score is
softmax(logits / T) (p ** (1/T) renormalised for a model that outputs probabilities), and the
prediction set at a coverage level is every label whose score reaches the level's recorded
threshold, best first, or the top label alone when none does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import pytest_asyncio

from app.bundle import load_bundle
from app.preprocess import Preprocessor
from app.settings import Settings
from tests.conftest import running_app
from tests.images import png
from tests.onnx_models import LABELS, classifier, write_calibrated_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

PNG = {"content-type": "image/png"}
INFER = "/v2/models/tiny/infer"
TEMPERATURE = 0.5  # sharper than the plain softmax: the tiny model's top score ~0.4, not ~0.2
# Chosen against the tiny model's scores: no label ever reaches 0.5 (so "0.9" answers the top
# label alone), 0.2 takes one or two labels, 0.05 several.
THRESHOLDS = {"0.9": 0.5, "0.95": 0.2, "0.99": 0.05}
CALIBRATION = {
    "temperature": TEMPERATURE,
    "thresholds": THRESHOLDS,
    "split": "calibration",
    "images": 500,
    "ece_before": 0.08,
    "ece_after": 0.02,
    "coverage": {"0.9": 0.91, "0.95": 0.952, "0.99": 0.991},
    "mean_set_size": {"0.9": 1.1, "0.95": 1.6, "0.99": 4.2},
}
IMAGES = [png(seed) for seed in range(12)]


class Reference:
    """The bundle's model run directly, and the served scores and sets computed in numpy."""

    def __init__(self, bundle: Path) -> None:
        loaded = load_bundle(bundle)
        self.manifest = loaded.manifest
        self.session = ort.InferenceSession(
            str(loaded.variant_path("fp32")), providers=["CPUExecutionProvider"]
        )
        self.preprocessor = Preprocessor(loaded.manifest.input)

    def outputs(self, data: bytes) -> np.ndarray:
        (outputs,) = self.session.run(None, {"input": self.preprocessor(data)})
        return np.asarray(outputs[0], np.float64)

    def scores(self, data: bytes) -> np.ndarray:
        outputs = self.outputs(data)
        if self.manifest.output.kind == "probabilities":
            outputs = np.log(outputs)
        calibration = self.manifest.calibration
        tempered = outputs / (calibration.temperature if calibration else 1.0)
        exp = np.exp(tempered - tempered.max())
        scores: np.ndarray = exp / exp.sum()
        return scores

    def prediction_set(self, data: bytes, coverage: str) -> dict[str, Any]:
        assert self.manifest.calibration is not None
        scores = self.scores(data)
        threshold = self.manifest.calibration.thresholds[coverage]
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        members = [i for i in ranked if scores[i] >= threshold] or ranked[:1]
        return {
            "coverage": float(coverage),
            "labels": [LABELS[i] for i in members],
            "indices": members,
            "scores": [float(scores[i]) for i in members],
        }


def settings(bundle: Path) -> Settings:
    return Settings(model=bundle, threads=1, max_batch_size=4)


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("calibrated") / "tiny" / "1"
    return write_calibrated_bundle(directory, CALIBRATION)


@pytest.fixture(scope="module")
def reference(calibrated_dir: Path) -> Reference:
    return Reference(calibrated_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(calibrated_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings(calibrated_dir)) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain(bundle_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The shared bundle, which has no calibration."""
    async with running_app(settings(bundle_dir)) as client:
        yield client


async def classify(client: httpx.AsyncClient, data: bytes, **params: str | int) -> httpx.Response:
    return await client.post("/classify", content=data, headers=PNG, params=params)


def assert_set(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert {k: v for k, v in got.items() if k != "scores"} == {
        k: v for k, v in want.items() if k != "scores"
    }
    assert got["scores"] == pytest.approx(want["scores"], rel=1e-12)


def assert_invalid(response: httpx.Response, *fragments: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "invalid_parameter"
    assert "\n" not in error["message"]
    for fragment in fragments:
        assert fragment in error["message"]


# -- POST /classify ---------------------------------------------------------------------------


async def test_scores_are_the_softmax_of_logits_over_the_temperature(api, reference):
    for data in IMAGES:
        response = await classify(api, data, top_k=10)
        assert response.status_code == 200, response.text
        assert "prediction_set" not in response.json()  # only when a coverage is asked for
        predictions = response.json()["predictions"]
        scores = reference.scores(data)
        assert [p["index"] for p in predictions] == np.argsort(-scores, kind="stable").tolist()
        assert [p["score"] for p in predictions] == pytest.approx(
            scores[[p["index"] for p in predictions]].tolist(), rel=1e-12
        )
        plain = np.exp(reference.outputs(data))
        assert predictions[0]["score"] > 1.5 * (plain / plain.sum()).max()  # T was applied


@pytest.mark.parametrize("coverage", sorted(THRESHOLDS))
async def test_prediction_sets_are_every_label_over_the_threshold(api, reference, coverage):
    sizes = []
    for data in IMAGES:
        response = await classify(api, data, coverage=coverage)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert len(answer["predictions"]) == 5  # the default top_k, beside the set
        assert_set(answer["prediction_set"], reference.prediction_set(data, coverage))
        sizes.append(len(answer["prediction_set"]["labels"]))
    # the thresholds take each path of the rule: the top label alone, one or two, several
    assert {"0.9": set(sizes) == {1}, "0.95": set(sizes) == {1, 2}, "0.99": min(sizes) >= 3}[
        coverage
    ], sizes


async def test_a_set_is_never_empty(api, reference):
    """No label reaches the "0.9" threshold: the set is the top label alone."""
    for data in IMAGES:
        assert reference.scores(data).max() < THRESHOLDS["0.9"]
        answer = (await classify(api, data, coverage="0.9", top_k=1)).json()
        (top,) = answer["predictions"]
        assert answer["prediction_set"] == {
            "coverage": 0.9,
            "labels": [top["label"]],
            "indices": [top["index"]],
            "scores": [top["score"]],
        }


async def test_set_and_predictions_agree_to_the_bit(api):
    """top_k and coverage combine; a label in both has the same score in both."""
    for data in IMAGES[:4]:
        answer = (await classify(api, data, top_k=2, coverage="0.99")).json()
        assert len(answer["predictions"]) == 2
        members = answer["prediction_set"]
        assert len(members["indices"]) > 2
        assert members["indices"][:2] == [p["index"] for p in answer["predictions"]]
        assert members["scores"][:2] == [p["score"] for p in answer["predictions"]]


@pytest.mark.parametrize(
    "value",
    ["abc", "", "0", "1", "1.0", "1.5", "-0.1", "nan", "inf", "1e-1", " 0.9", "0_9", "9" * 500],
)
async def test_coverage_not_a_number_in_the_open_unit_interval(api, value):
    response = await api.post(f"/classify?coverage={value}", content=png(), headers=PNG)
    assert_invalid(response, "coverage must be a number between 0 and 1")


@pytest.mark.parametrize("value", ["0.5", "0.8", "0.951", "0.999"])
async def test_coverage_not_recorded_names_the_recorded_levels(api, value):
    response = await classify(api, png(), coverage=value)
    assert_invalid(response, f"coverage {float(value)!r}", "0.9, 0.95, 0.99")


async def test_recorded_levels_written_otherwise_are_the_same_level(api, reference):
    data = IMAGES[0]
    for value in ("0.950", ".95", "0.95000"):
        answer = (await classify(api, data, coverage=value)).json()
        assert_set(answer["prediction_set"], reference.prediction_set(data, "0.95"))


async def test_top_k_is_still_checked_beside_coverage(api):
    assert_invalid(await classify(api, png(), top_k=0, coverage="0.9"), "top_k")


async def test_a_bundle_without_calibration_answers_as_before_and_refuses_coverage(
    plain, bundle_dir
):
    manifest = load_bundle(bundle_dir).manifest
    assert manifest.calibration is None
    session = ort.InferenceSession(
        str(load_bundle(bundle_dir).variant_path("int8")), providers=["CPUExecutionProvider"]
    )
    preprocess = Preprocessor(manifest.input)
    for data in IMAGES[:3]:
        answer = (await classify(plain, data, top_k=10)).json()
        assert set(answer) == {"model", "predictions"}
        (logits,) = session.run(None, {"input": preprocess(data)})
        exp = np.exp(logits[0].astype(np.float64) - logits[0].max())
        scores = exp / exp.sum()  # the plain softmax
        assert [p["score"] for p in answer["predictions"]] == pytest.approx(
            np.sort(scores)[::-1].tolist(), rel=1e-12
        )
    refused = await classify(plain, png(), coverage="0.95")
    assert_invalid(refused, "no conformal calibration", "labelled data", "blink import --eval")


# -- a model that outputs probabilities -------------------------------------------------------


async def test_probability_outputs_are_raised_to_one_over_t_and_renormalised(tmp_path):
    model = classifier(channels=1, size=28, classes=10, softmax=True)
    bundle = write_calibrated_bundle(tmp_path / "probs" / "1", CALIBRATION, model)
    reference = Reference(bundle)
    async with running_app(settings(bundle)) as client:
        for data in IMAGES[:4]:
            answer = (await classify(client, data, top_k=10, coverage="0.95")).json()
            p = reference.outputs(data)
            powered = p ** (1 / TEMPERATURE)
            want = powered / powered.sum()
            scores = {row["index"]: row["score"] for row in answer["predictions"]}
            assert [scores[i] for i in range(10)] == pytest.approx(want.tolist(), rel=1e-9)
            assert_set(answer["prediction_set"], reference.prediction_set(data, "0.95"))


# -- /v1/models -------------------------------------------------------------------------------


async def test_models_shows_the_calibration(api):
    (model,) = (await api.get("/v1/models")).json()["models"]
    calibration = model["calibration"]
    assert calibration["calibrated"] is True
    assert calibration["temperature"] == TEMPERATURE
    assert calibration["coverage_levels"] == [0.9, 0.95, 0.99]
    assert calibration["thresholds"] == THRESHOLDS
    assert calibration["measured_coverage"] == CALIBRATION["coverage"]
    assert calibration["mean_set_size"] == CALIBRATION["mean_set_size"]
    assert (calibration["split"], calibration["images"]) == ("calibration", 500)
    assert (calibration["ece_before"], calibration["ece_after"]) == (0.08, 0.02)
    assert "temperature 0.5" in calibration["summary"]
    assert "0.9, 0.95, 0.99" in calibration["summary"]


async def test_models_says_when_there_is_no_calibration(plain):
    (model,) = (await plain.get("/v1/models")).json()["models"]
    calibration = model["calibration"]
    assert calibration["calibrated"] is False
    assert calibration["temperature"] == 1.0 and calibration["coverage_levels"] == []
    assert "plain softmax" in calibration["summary"]
    assert "prediction sets are unavailable" in calibration["summary"]


# -- V2 (Open Inference Protocol), JSON over httpx ----------------------------------------------


def pixels(*bodies: bytes, reference: Reference) -> dict[str, Any]:
    tensor = np.concatenate([reference.preprocessor(body) for body in bodies])
    return {
        "name": "input",
        "shape": list(tensor.shape),
        "datatype": "FP32",
        "data": tensor.ravel().tolist(),
    }


async def test_v2_probabilities_and_prediction_sets(api, reference):
    bodies = IMAGES[:3]
    request = {"inputs": [pixels(*bodies, reference=reference)], "parameters": {"coverage": 0.95}}
    response = await api.post(INFER, json=request)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert list(outputs) == ["logits", "probabilities", "prediction_set"]
    logits = np.array(outputs["logits"]["data"]).reshape(3, 10)
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 10)
    sets = outputs["prediction_set"]
    assert (sets["datatype"], sets["shape"]) == ("BYTES", [3])
    for i, body in enumerate(bodies):
        # logits stay the model's own; probabilities are the calibrated scores
        np.testing.assert_allclose(logits[i], reference.outputs(body), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probabilities[i], reference.scores(body), rtol=1e-5)
        assert_set(json.loads(sets["data"][i]), reference.prediction_set(body, "0.95"))


async def test_v2_classification_extension_uses_calibrated_scores(api, reference):
    body = IMAGES[5]
    request = {
        "inputs": [pixels(body, reference=reference)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    response = await api.post(INFER, json=request)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    rows = [item.split(":") for item in output["data"]]
    scores = reference.scores(body)
    assert [int(index) for _, index, _ in rows] == np.argsort(-scores, kind="stable")[:3].tolist()
    assert [float(score) for score, _, _ in rows] == pytest.approx(
        np.sort(scores)[::-1][:3].tolist(), rel=1e-12
    )


async def test_v2_prediction_set_named_as_binary(api, reference):
    body = IMAGES[6]
    request = {
        "inputs": [pixels(body, reference=reference)],
        "parameters": {"coverage": 0.99},
        "outputs": [{"name": "prediction_set", "parameters": {"binary_data": True}}],
    }
    encoded = orjson.dumps(request)
    response = await api.post(INFER, content=encoded)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:length])
    (output,) = header["outputs"]
    assert output["name"] == "prediction_set" and output["shape"] == [1]
    blob = response.content[length:]
    assert int.from_bytes(blob[:4], "little") == len(blob) - 4
    assert_set(json.loads(blob[4:]), reference.prediction_set(body, "0.99"))


@pytest.mark.parametrize(
    ("parameters", "outputs", "fragments"),
    [
        ({"coverage": "0.95"}, None, ["parameters.coverage must be a number between 0 and 1"]),
        ({"coverage": True}, None, ["parameters.coverage must be a number"]),
        ({"coverage": 1}, None, ["parameters.coverage must be a number"]),
        ({"coverage": 0}, None, ["parameters.coverage must be a number"]),
        ({"coverage": 0.8}, None, ["parameters.coverage: coverage 0.8", "0.9, 0.95, 0.99"]),
        ({}, [{"name": "prediction_set"}], ["'prediction_set' needs parameters.coverage"]),
        (
            {"coverage": 0.9},
            [{"name": "prediction_set", "parameters": {"classification": 2}}],
            ["'prediction_set' has no classification"],
        ),
    ],
)
async def test_v2_coverage_errors_are_400(api, reference, parameters, outputs, fragments):
    request: dict[str, Any] = {"inputs": [pixels(png(), reference=reference)]}
    request["parameters"] = parameters
    if outputs is not None:
        request["outputs"] = outputs
    response = await api.post(INFER, json=request)
    assert response.status_code == 400, response.text
    (message,) = response.json().values()
    for fragment in fragments:
        assert fragment in message


async def test_v2_without_calibration_refuses_coverage(plain, bundle_dir):
    reference = Reference(bundle_dir)
    request = {"inputs": [pixels(png(), reference=reference)], "parameters": {"coverage": 0.9}}
    response = await plain.post(INFER, json=request)
    assert response.status_code == 400, response.text
    assert "no conformal calibration" in response.json()["error"]
    metadata = (await plain.get("/v2/models/tiny")).json()
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "probabilities"]


async def test_v2_metadata_and_config_name_the_calibration(api):
    metadata = (await api.get("/v2/models/tiny")).json()
    (sets,) = [o for o in metadata["outputs"] if o["name"] == "prediction_set"]
    assert (sets["datatype"], sets["shape"]) == ("BYTES", [-1])
    assert sets["parameters"]["coverage_levels"] == "0.9,0.95,0.99"
    config = (await api.get("/v2/models/tiny/config")).json()
    assert config["parameters"]["temperature"] == {"string_value": "0.5"}
    assert config["parameters"]["coverage_levels"] == {"string_value": "0.9,0.95,0.99"}
