"""The official Triton HTTP client against a real server, answers checked against /classify."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.bundle import load_bundle
from app.preprocess import Preprocessor
from tests.conftest import live_server
from tests.images import png
from tests.onnx_models import write_calibrated_bundle

MAX_BATCH = 4  # below the client batch of 8, so the server must split it


@pytest.fixture(scope="module")
def server(bundle_dir: Path) -> Iterator[str]:
    with live_server(bundle_dir, threads=1, max_batch_size=MAX_BATCH) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def manifest(bundle_dir: Path):
    return load_bundle(bundle_dir).manifest


def classify(url: str, body: bytes, k: int = 10) -> list[dict]:
    response = httpx.post(
        f"{url}/classify", content=body, params={"top_k": k}, headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def classify_scores(url: str, body: bytes, classes: int) -> np.ndarray:
    """/classify's probabilities, dense by class index."""
    scores = np.zeros(classes)
    for prediction in classify(url, body, classes):
        scores[prediction["index"]] = prediction["score"]
    return scores


def images_input(bodies: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(bodies)], "BYTES")
    tensor.set_data_from_numpy(np.array(bodies, dtype=object), binary_data=binary)
    return tensor


def test_health_and_metadata(client, manifest):
    name, version = manifest.name, manifest.version
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, version)
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(name, "no-such-version")

    server = client.get_server_metadata()
    assert server["name"] == "blink"
    assert {"classification", "binary_tensor_data", "statistics"} <= set(server["extensions"])

    metadata = client.get_model_metadata(name, version)
    assert metadata["name"] == name and metadata["versions"] == [version]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert inputs == {"input": ("FP32", [-1, 1, 28, 28]), "image": ("BYTES", [-1])}
    outputs = {t["name"]: t["shape"] for t in metadata["outputs"]}
    assert outputs == {"logits": [-1, 10], "probabilities": [-1, 10]}

    config = client.get_model_config(name)
    assert config["max_batch_size"] == MAX_BATCH
    assert [(i["name"], i["dims"]) for i in config["input"]] == [
        ("input", [1, 28, 28]),
        ("image", [1]),
    ]
    assert {o["name"] for o in config["output"]} == {"logits", "probabilities"}

    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as error:
        client.get_model_metadata("nope")
    assert error.value.status() == "404"


def test_batch_of_8_encoded_images_in_binary_equals_classify(client, server, manifest):
    bodies = [png(seed) for seed in range(8)]
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=True),
        triton.InferRequestedOutput("logits", binary_data=True),
    ]
    result = client.infer(manifest.name, [images_input(bodies)], outputs=outputs)

    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (8, 10) and probabilities.dtype == np.float32
    expected = np.stack([classify_scores(server, body, 10) for body in bodies])
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)
    logits = result.as_numpy("logits")
    assert logits.shape == (8, 10)
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()

    # the batch went through the micro-batcher in blocks the engine takes
    stats = client.get_inference_statistics(manifest.name)["model_stats"][0]
    assert stats["inference_count"] >= 8
    assert max(b["batch_size"] for b in stats["batch_stats"]) <= MAX_BATCH


def test_preprocessed_fp32_tensor_in_json_equals_classify(client, server, manifest):
    bodies = [png(seed) for seed in (10, 11, 12)]
    preprocess = Preprocessor(manifest.input)
    pixels = np.concatenate([preprocess(body) for body in bodies])
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False)]

    result = client.infer(manifest.name, [tensor], outputs=outputs, model_version=manifest.version)

    response = result.get_response()
    assert "data" in response["outputs"][0]  # JSON, not binary
    expected = np.stack([classify_scores(server, body, 10) for body in bodies])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-7)


def test_json_bytes_input_with_binary_default_outputs(client, server, manifest):
    # An encoded image is not UTF-8, so in JSON it needs base64: tritonclient only sends the
    # tensor as JSON, so the JSON BYTES path is covered by test_v2_errors with httpx.
    body = png(20)
    result = client.infer(manifest.name, [images_input([body], binary=True)])  # no outputs named
    response = result.get_response()
    assert {o["name"] for o in response["outputs"]} == {"logits", "probabilities"}
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    np.testing.assert_allclose(
        result.as_numpy("probabilities")[0], classify_scores(server, body, 10), rtol=1e-6
    )


def test_classification_extension_prints_classify_scores(client, server, manifest):
    bodies = [png(seed) for seed in (30, 31)]
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3),
        triton.InferRequestedOutput("logits", binary_data=False, class_count=2),
    ]
    result = client.infer(manifest.name, [images_input(bodies)], outputs=outputs)

    top3 = result.as_numpy("probabilities")
    assert top3.shape == (2, 3)
    for row, body in zip(top3, bodies, strict=True):
        expected = [f"{p['score']!r}:{p['index']}:{p['label']}" for p in classify(server, body, 3)]
        assert [item.decode() for item in row] == expected

    top2 = result.as_numpy("logits")
    assert top2.shape == (2, 2)
    for row, body in zip(top2, bodies, strict=True):
        expected = [f":{p['index']}:{p['label']}" for p in classify(server, body, 2)]
        strings = [item.decode() if isinstance(item, bytes) else item for item in row]
        assert [s[s.index(":") :] for s in strings] == expected


def test_request_id_compression_and_timeout(client, server, manifest):
    body = png(40)
    result = client.infer(
        manifest.name,
        [images_input([body])],
        request_id="req-7",
        timeout=10_000_000,  # 10 s, in microseconds
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    assert result.get_response()["id"] == "req-7"
    np.testing.assert_allclose(
        result.as_numpy("probabilities")[0], classify_scores(server, body, 10), rtol=1e-6
    )

    # a deadline of 1 us has passed before the request can run
    with pytest.raises(InferenceServerException) as error:
        client.infer(manifest.name, [images_input([body])], timeout=1)
    assert error.value.status() == "504"


def test_statistics_count_requests_and_stages(client, manifest):
    before = client.get_inference_statistics(manifest.name)["model_stats"][0]
    client.infer(manifest.name, [images_input([png(50), png(51)])])
    after = client.get_inference_statistics(manifest.name, manifest.version)["model_stats"][0]

    assert after["name"] == manifest.name and after["version"] == manifest.version
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["execution_count"] >= before["execution_count"] + 1
    stages = after["inference_stats"]
    assert stages["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stages[stage]["count"] == stages["success"]["count"]
        assert stages[stage]["ns"] > 0
    assert after["last_inference"] > 0


# Sharper than the plain softmax; "0.9" is never reached by the tiny model (its top label alone),
# "0.99" takes several labels.
CALIBRATION = {"temperature": 0.5, "thresholds": {"0.9": 0.5, "0.95": 0.2, "0.99": 0.05}}


@pytest.fixture(scope="module")
def calibrated_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    bundle = write_calibrated_bundle(tmp_path_factory.mktemp("v2cal") / "tiny" / "1", CALIBRATION)
    with live_server(bundle, threads=1, max_batch_size=MAX_BATCH) as url:
        yield url


def classify_set(url: str, body: bytes, coverage: float) -> dict:
    response = httpx.post(
        f"{url}/classify", content=body, params={"coverage": coverage},
        headers={"content-type": "image/png"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    answer: dict = response.json()["prediction_set"]
    return answer


@pytest.mark.parametrize("binary", [True, False])
def test_coverage_parameter_answers_prediction_sets_equal_to_classify(calibrated_server, binary):
    client = triton.InferenceServerClient(calibrated_server.removeprefix("http://"))
    try:
        bodies = [png(seed) for seed in range(60, 66)]  # above MAX_BATCH: split and put back
        outputs = [
            triton.InferRequestedOutput("probabilities", binary_data=binary),
            triton.InferRequestedOutput("prediction_set", binary_data=binary),
        ]
        for coverage in (0.9, 0.99):
            result = client.infer(
                "tiny", [images_input(bodies)], outputs=outputs, parameters={"coverage": coverage}
            )
            sets = result.as_numpy("prediction_set")
            assert sets.shape == (len(bodies),)
            probabilities = result.as_numpy("probabilities")
            for body, row, encoded in zip(bodies, probabilities, sets, strict=True):
                text = encoded.decode() if isinstance(encoded, bytes) else encoded
                found = json.loads(text)
                assert found == classify_set(calibrated_server, body, coverage)
                # the set is read off the calibrated probabilities the answer carries
                np.testing.assert_allclose(row[found["indices"]], found["scores"], rtol=1e-6)
                if coverage == 0.9:
                    assert found["indices"] == [int(row.argmax())]

        # a level the bundle did not record is refused, as V2 errors are
        with pytest.raises(InferenceServerException, match=r"0\.9, 0\.95, 0\.99") as error:
            client.infer("tiny", [images_input(bodies[:1])], parameters={"coverage": 0.8})
        assert error.value.status() == "400"
    finally:
        client.close()


def test_coverage_refused_without_calibration(client, manifest):
    with pytest.raises(InferenceServerException, match="no conformal calibration") as error:
        client.infer(manifest.name, [images_input([png(1)])], parameters={"coverage": 0.9})
    assert error.value.status() == "400"
