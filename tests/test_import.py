"""`blink import` on small generated ONNX classifiers: bundles written, errors refused, served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from app.bundle import load_bundle
from app.cli import main as blink
from app.preprocess import Preprocessor
from app.settings import Settings
from tests.conftest import running_app
from tests.images import encode
from tests.onnx_models import classifier

LABELS = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labels, and a folder of real encoded photos-like images for calibration."""
    root = tmp_path_factory.mktemp("import")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    rng = np.random.default_rng(0)
    for i in range(16):
        folder = root / "calibration" / f"batch{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth once enlarged
        image = Image.fromarray(small).resize((64 + 8 * i, 48 + 4 * i), Image.Resampling.BILINEAR)
        image.save(folder / f"{i}.jpg" if i % 2 else folder / f"{i}.png")
    return root


def save(model: onnx.ModelProto, directory: Path, name: str) -> Path:
    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def import_model(capsys, *argv: object) -> tuple[int, str]:
    """Run `blink import` in-process; its exit status and its stderr."""
    status = blink(["import", *map(str, argv)])
    return status, capsys.readouterr().err


def imported(repository: Path, name: str):
    return load_bundle(repository / name)


def predictions(model_path: Path, spec, images: list[bytes]) -> np.ndarray:
    """What the source model itself answers, for the service's preprocessing of `images`."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    pixels = np.concatenate([Preprocessor(spec)(data) for data in images])
    return np.concatenate([session.run(None, {"input": p[None]})[0] for p in pixels])


def test_nchw_logits_with_calibration_and_eval(tmp_path, workspace, capsys):
    source = save(classifier(), tmp_path, "nchw")
    # eval folders named by what the model answers: the accuracy must come out at exactly 1
    images = [p.read_bytes() for p in sorted((workspace / "calibration").rglob("*.*"))]
    spec = load_spec_for(source, tmp_path, workspace, capsys)
    answers = predictions(source, spec, images).argmax(1)
    for i, (data, answer) in enumerate(zip(images, answers, strict=True)):
        folder = tmp_path / "eval" / LABELS[answer].upper()  # case is ignored in matching
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.img.png").write_bytes(data)
    status, err = import_model(
        capsys,
        source,
        "--labels",
        workspace / "labels.txt",
        "--calibrate",
        workspace / "calibration",
        "--eval",
        tmp_path / "eval",
        "--max-int8-drop",
        "100",
        "--out",
        tmp_path / "repo",
        "--version",
        "2",
    )
    assert status == 0, err
    bundle = imported(tmp_path / "repo", "nchw")
    manifest = bundle.manifest
    assert (bundle.directory.name, manifest.version) == ("2", "2")
    assert sorted(manifest.variants) == ["fp16", "fp32", "int8"]
    assert manifest.input.layout == "NCHW" and manifest.output.kind == "logits"
    assert (manifest.input.height, manifest.input.width, manifest.input.color) == (16, 16, "RGB")
    assert manifest.input.crop_fraction == 0.875  # the RGB default
    assert manifest.metrics["fp32"]["accuracy"] == 1.0
    assert len(manifest.metrics["int8"]["confusion_matrix"]) == len(LABELS)
    assert "macro_f1" in manifest.metrics["fp16"]
    report = (bundle.directory / "report.md").read_text()
    assert "| fp32 | 100.00% |" in report
    assert (bundle.directory / "confusion_matrix.png").is_file()


def load_spec_for(source: Path, tmp_path: Path, workspace: Path, capsys):
    """The input spec an fp32-only import of `source` writes (the flags' defaults)."""
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--out", tmp_path / "probe"
    )
    assert status == 0, err
    return imported(tmp_path / "probe", source.stem).manifest.input


def test_without_calibration_only_fp32_and_the_report_says_why(tmp_path, workspace, capsys):
    source = save(classifier(channels=1, size=12), tmp_path, "grey")
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--out", tmp_path / "repo"
    )
    assert status == 0, err
    bundle = imported(tmp_path / "repo", "grey")
    assert list(bundle.manifest.variants) == ["fp32"]
    assert bundle.manifest.reference is None  # no --eval: no reference behaviour to record
    assert bundle.manifest.input.color == "L" and bundle.manifest.input.crop_fraction == 1.0
    report = (bundle.directory / "report.md").read_text()
    assert "fp32 only: no --calibrate DIR was given" in report
    assert "Accuracy: not measured" in report


def test_flags_override_what_the_model_suggests(tmp_path, workspace, capsys):
    source = save(classifier(size=20), tmp_path, "flags")
    (tmp_path / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(LABELS)}))
    status, err = import_model(
        capsys,
        source,
        "--labels",
        tmp_path / "labels.json",
        "--mean",
        "inception",
        "--crop-fraction",
        "0.9",
        "--interpolation",
        "bicubic",
        "--resize",
        "stretch",
        "--name",
        "custom",
        "--out",
        tmp_path / "repo",
    )
    assert status == 0, err
    spec = imported(tmp_path / "repo", "custom").manifest.input
    assert (spec.mean, spec.std) == ([0.5] * 3, [0.5] * 3)
    assert (spec.crop_fraction, spec.interpolation, spec.resize) == (0.9, "bicubic", "stretch")
    assert imported(tmp_path / "repo", "custom").manifest.labels == LABELS


@pytest.mark.parametrize(
    ("model", "rewritten"),
    [
        (classifier(batch=1), ["input: batch dimension 1 -> batch"]),
        (classifier(batch=1, batch_in_reshape=True), ["Reshape flat: shape[0] 1 -> 0"]),
        (classifier(batch=3, batch_in_reshape=True), ["Reshape flat: shape[0] 3 -> 0"]),
        (classifier(), []),
    ],
    ids=["fixed-1", "fixed-1-reshape", "fixed-3-reshape", "dynamic"],
)
def test_a_fixed_batch_is_rewritten_dynamic_and_checked(
    tmp_path, workspace, capsys, model, rewritten
):
    source = save(model, tmp_path, "batch")
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--out", tmp_path / "repo"
    )
    assert status == 0, err
    bundle = imported(tmp_path / "repo", "batch")
    notes = bundle.manifest.provenance["batch"]
    assert all(change in notes for change in rewritten)
    assert bool(notes) == bool(rewritten)
    # the served variant takes any batch, and answers each image as the source model does
    session = ort.InferenceSession(str(bundle.variant_path("fp32")))
    (batch_dim,) = {i.shape[0] for i in session.get_inputs()}
    assert isinstance(batch_dim, str)
    images = np.random.default_rng(1).normal(0, 1, (5, 3, 16, 16)).astype(np.float32)
    (together,) = session.run(None, {"input": images})
    reference = ort.InferenceSession(str(source))
    fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1
    alone = [
        reference.run(None, {"input": np.repeat(image[None], fixed, axis=0)})[0][0]
        for image in images
    ]
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-5, atol=1e-5)


def bad_models() -> dict[str, tuple[onnx.ModelProto | bytes, list[str], str]]:
    """name -> (model or raw bytes, extra flags, what the one-line error must say)."""
    rank3 = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["input"], ["logits"])],
            "rank3",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 16, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 16, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    feature_map = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["input"], ["logits"])],
            "features",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, 8, 8])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    return {
        "not-onnx": (b"\x89PNG\r\n\x1a\n not a model at all", [], "is not an ONNX file"),
        "rank": (rank3, [], "has rank 3"),
        "color": (classifier(channels=3), ["--color", "L"], "--color L needs 1 channel"),
        "layout": (classifier(channels=3), ["--layout", "NHWC"], "16 channels where NHWC"),
        "classes": (classifier(classes=5), [], "has 5 classes but there are 4 labels"),
        "output": (feature_map, [], "must be [N, classes]"),
        "size": (classifier(size=16), ["--size", "24"], "contradicts"),
        "hidden-batch": (
            classifier(batch=1, batch_in_reshape=True, hidden_batch=True),
            [],
            "fixed batch size of 1 and making it dynamic failed",
        ),
        "no-labels-flag": (classifier(), ["--labels", "/nonexistent/labels.txt"], "cannot read"),
    }


@pytest.mark.parametrize("case", list(bad_models()))
def test_bad_input_is_one_line_and_exit_2(tmp_path, workspace, capsys, case):
    model, flags, message = bad_models()[case]
    path = tmp_path / "bad.onnx"
    if isinstance(model, bytes):
        path.write_bytes(model)
    else:
        onnx.save(model, str(path))
    argv = [path, "--labels", workspace / "labels.txt", *flags, "--out", tmp_path / "repo"]
    status, err = import_model(capsys, *argv)
    errors = [line for line in err.splitlines() if not line.startswith("[build]")]
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("blink import: error: "), err
    assert message in errors[0]
    assert not (tmp_path / "repo" / "bad" / "latest").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a\n\nb\nc\nd\n", "line 2 is empty"),
        ('{"0": "a", "2": "b"}', "must run from 0"),
        ('{"zero": "a"}', "keys must be class indices"),
        ("[1, 2]", "expected a list of names"),
    ],
)
def test_bad_labels_files(tmp_path, capsys, content, message):
    source = save(classifier(), tmp_path, "m")
    labels = tmp_path / ("labels.json" if content[0] in "[{" else "labels.txt")
    labels.write_text(content)
    status, err = import_model(capsys, source, "--labels", labels, "--out", tmp_path / "repo")
    assert status == 2 and message in err and len(err.splitlines()) == 1


def test_eval_folder_naming_no_label_is_refused(tmp_path, workspace, capsys):
    (tmp_path / "eval" / "zebra").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "eval" / "zebra" / "z.png")
    source = save(classifier(), tmp_path, "m")
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--eval", tmp_path / "eval",
        "--out", tmp_path / "repo",
    )  # fmt: skip
    assert status == 2 and "folders zebra match no label" in err


def test_gate_failure_keeps_the_bundle_but_not_latest(tmp_path, workspace, capsys):
    source = save(classifier(), tmp_path, "gated")
    # every image filed under a class the model does not answer: accuracy 0
    data = encode(Image.new("RGB", (30, 30), (200, 10, 10)), "PNG")
    spec = load_spec_for(source, tmp_path, workspace, capsys)
    wrong = LABELS[(int(predictions(source, spec, [data]).argmax()) + 1) % len(LABELS)]
    (tmp_path / "eval" / wrong).mkdir(parents=True)
    (tmp_path / "eval" / wrong / "x.png").write_bytes(data)
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--eval", tmp_path / "eval",
        "--min-accuracy", "0.5", "--out", tmp_path / "repo", "--version", "v1",
    )  # fmt: skip
    assert status == 1 and "below --min-accuracy" in err
    assert (tmp_path / "repo" / "gated" / "v1" / "manifest.json").is_file()
    assert not (tmp_path / "repo" / "gated" / "latest").exists()


async def test_served_nhwc_probability_model_answers_without_a_second_softmax(
    tmp_path, workspace, capsys
):
    source = save(classifier(layout="NHWC", softmax=True, size=24), tmp_path, "keras")
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--calibrate",
        workspace / "calibration", "--out", tmp_path / "repo",
    )  # fmt: skip
    assert status == 0, err
    manifest = imported(tmp_path / "repo", "keras").manifest
    assert (manifest.input.layout, manifest.output.kind) == ("NHWC", "probabilities")
    image = encode(
        Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)), "PNG"
    )
    pixels = Preprocessor(manifest.input)(image)
    assert pixels.shape == (1, 24, 24, 3)
    (expected,) = ort.InferenceSession(str(source)).run(None, {"input": pixels})
    settings = Settings(model=tmp_path / "repo" / "keras", threads=1, model_variant="fp32")
    async with running_app(settings) as api:
        answer = (await api.post("/classify?top_k=4", content=image)).json()
        scores = {p["index"]: p["score"] for p in answer["predictions"]}
        np.testing.assert_allclose([scores[i] for i in range(4)], expected[0], rtol=1e-5)
        (model,) = (await api.get("/v1/models")).json()["models"]
        assert model["input"]["shape"] == ["batch", 24, 24, 3]
        assert model["input"]["layout"] == "NHWC"
        assert model["output"] == {"name": "probabilities", "kind": "probabilities"}
        metadata = (await api.get("/v2/models/keras")).json()
        assert metadata["inputs"][0]["shape"] == [-1, 24, 24, 3]
        assert metadata["inputs"][0]["parameters"] == {"layout": "NHWC"}
        assert metadata["inputs"][1]["parameters"]["crop_fraction"] == 0.875
        assert [o["name"] for o in metadata["outputs"]] == ["probabilities"]
        config = (await api.get("/v2/models/keras/config")).json()
        assert config["input"][0]["format"] == "FORMAT_NHWC"
        assert config["parameters"]["output_kind"] == {"string_value": "probabilities"}
        tensor = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 24, 24, 3],
                    "datatype": "FP32",
                    "data": np.concatenate([pixels, pixels]).ravel().tolist(),
                }
            ]
        }
        v2 = (await api.post("/v2/models/keras/infer", json=tensor)).json()
        (output,) = v2["outputs"]
        assert output["name"] == "probabilities" and output["shape"] == [2, 4]
        np.testing.assert_allclose(output["data"][:4], expected[0], rtol=1e-5)
        refused = await api.post(
            "/v2/models/keras/infer", json={**tensor, "outputs": [{"name": "logits"}]}
        )
        assert refused.status_code == 400 and "outputs are ['probabilities']" in refused.text


@pytest.mark.parametrize("count", [1, 64, 130, 218])
def test_calibration_batches_are_equal_for_any_image_count(count):
    from models.compress.quantize import BatchReader

    reader = BatchReader(np.zeros((count, 3, 2, 2), np.float32), "input")
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(len(batch["input"]))
    assert sum(sizes) == count and len(set(sizes)) == 1 and sizes[0] <= 64


def write_eval_folder(folder: Path, source: Path, tmp_path: Path, workspace: Path, capsys):
    """The workspace's images filed under the class the model answers for each."""
    images = [p.read_bytes() for p in sorted((workspace / "calibration").rglob("*.*"))]
    spec = load_spec_for(source, tmp_path, workspace, capsys)
    answers = predictions(source, spec, images).argmax(1)
    for i, (data, answer) in enumerate(zip(images, answers, strict=True)):
        (folder / LABELS[answer]).mkdir(parents=True, exist_ok=True)
        (folder / LABELS[answer] / f"{i}.png").write_bytes(data)


def test_eval_images_calibrate_scores_and_prediction_sets(tmp_path, workspace, capsys):
    """A quarter of the --eval images fits the temperature, a quarter the thresholds of the
    levels asked for, and the rest measures them; a level too many for the split is refused."""
    source = save(classifier(), tmp_path, "calibrated")
    write_eval_folder(tmp_path / "eval", source, tmp_path, workspace, capsys)
    common = ["--labels", workspace / "labels.txt", "--eval", tmp_path / "eval"]
    common += ["--out", tmp_path / "repo"]
    status, err = import_model(capsys, source, *common, "--coverage", "0.5,0.6")
    assert status == 0, err
    calibration = imported(tmp_path / "repo", "calibrated").manifest.calibration
    assert calibration is not None and calibration.temperature > 0
    assert sorted(calibration.thresholds) == ["0.5", "0.6"]
    assert set(calibration.coverage) == {"0.5", "0.6"}
    assert all(0 <= value <= 1 for value in calibration.coverage.values())
    assert "--eval images, fp32 outputs" in calibration.split
    # the reference behaviour, on the half of the --eval images that measures
    reference = imported(tmp_path / "repo", "calibrated").manifest.reference
    total = len(list((tmp_path / "eval").rglob("*.png")))
    assert reference is not None and total // 3 <= reference.images < total
    assert "--eval images" in reference.split
    assert sum(reference.class_frequencies) == pytest.approx(1)
    status, err = import_model(capsys, source, *common, "--coverage", "0.99", "--version", "v2")
    assert status == 2 and "too few --eval images for the calibration split" in err
    status, err = import_model(
        capsys, source, "--labels", workspace / "labels.txt", "--coverage", "0.9",
        "--out", tmp_path / "repo",
    )  # fmt: skip
    assert status == 2 and "--coverage needs --eval DIR" in err
