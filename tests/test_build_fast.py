"""A tiny real build (every stage, seconds of training) and the service serving what it wrote."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from app.bundle import load_bundle, sha256_of, verify_variant
from app.settings import Settings
from models.commands.build import main as build_main
from models.data import datasets as data
from models.train import loop as train
from tests.conftest import running_app
from tests.test_build_data import write_image_folder

pytestmark = pytest.mark.skipif(
    not (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)",
)
TINY = ["--limit", "1000", "--epochs", "1", "--width", "4", "--calibration-images", "64"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repository")


@pytest.fixture(scope="module")
def built(repository: Path) -> Path:
    """One tiny build that passes its gate (a drop allowance no 1-epoch model can miss)."""
    argv = [*TINY, "--out", str(repository), "--version", "v1", "--max-int8-drop", "100"]
    assert build_main(argv) == 0
    return repository / "fashion-mnist"


def test_latest_points_at_the_version(built: Path) -> None:
    assert (built / "latest").is_symlink()
    assert os.readlink(built / "latest") == "v1"
    assert load_bundle(built).directory.resolve() == (built / "v1").resolve()
    assert not [p for p in built.iterdir() if p.name.startswith(".")]  # no staging left over


def test_manifest_records_the_reference_behaviour_on_the_test_split(built: Path) -> None:
    manifest = load_bundle(built / "latest").manifest
    reference = manifest.reference
    assert reference is not None and reference.images > 0
    assert "test split" in reference.split and "int8 outputs" in reference.split
    assert len(reference.class_frequencies) == len(manifest.labels)
    assert sum(reference.class_frequencies) == pytest.approx(1)
    assert sum(reference.score_frequencies) == pytest.approx(1)
    assert 0 <= reference.low_confidence_rate <= 1


def test_manifest_has_every_contract_field(built: Path) -> None:
    bundle = load_bundle(built / "latest")
    manifest = bundle.manifest
    assert (manifest.name, manifest.version) == ("fashion-mnist", "v1")
    assert manifest.labels == data.FASHION_MNIST_LABELS
    spec = manifest.input
    assert (spec.name, spec.height, spec.width, spec.channels, spec.color) == (
        "input",
        28,
        28,
        1,
        "L",
    )
    assert 0.2 < spec.mean[0] < 0.4 and 0.25 < spec.std[0] < 0.45
    assert manifest.output.name == "logits"
    files = {v: f.file for v, f in manifest.variants.items()}
    assert files == {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
    for variant, entry in manifest.variants.items():
        path = verify_variant(bundle, variant)
        assert entry.sha256 == sha256_of(path) and entry.size == path.stat().st_size
        metrics = manifest.metrics[variant]
        assert 0 <= metrics["accuracy"] <= 1
        assert metrics["batch1_images_per_s"] > 0 and metrics["batch32_images_per_s"] > 0
        assert np.asarray(metrics["confusion_matrix"]).sum() == 200  # --limit 1000 -> 200 test
    provenance = manifest.provenance
    dataset = data.load_fashion_mnist(data.FASHION_MNIST_DIR)
    assert provenance["dataset"]["sha256"] == dataset.sha256
    assert provenance["dataset"]["files"] == dataset.files
    assert provenance["seed"] == 0 and provenance["epochs"] == 1
    assert provenance["argv"][:2] == ["--limit", "1000"]
    assert provenance["libraries"]["torch"].startswith("2.13.0")
    assert {"onnx", "onnxruntime"} <= set(provenance["libraries"])
    assert provenance["gate"]["passed"] is True
    assert provenance["parity_max_abs_logit_diff"] < 1e-3
    expected = "bf16" if train.native_bf16() else "fp32"  # what "auto" means on a CPU
    assert provenance["training"]["precision"] == expected


def test_manifest_on_disk_is_what_the_loader_reads(built: Path) -> None:
    raw = json.loads((built / "latest" / "manifest.json").read_text())
    assert raw["schema"] == 2 and "schema_" not in raw


def test_report_and_plots_are_written(built: Path) -> None:
    directory = built / "latest"
    report = (directory / "report.md").read_text()
    for heading in ("## Variants", "## Per class", "## Training", "## Compression", "Parity"):
        assert heading in report
    for plot in ("training_curves.png", "confusion_matrix.png", "accuracy_vs_cost.png"):
        assert (directory / plot).read_bytes().startswith(b"\x89PNG")


async def test_the_service_serves_the_build(built: Path) -> None:
    """The real app, on `<repository>/fashion-mnist`, classifies a test image PNG with INT8."""
    dataset = data.load_fashion_mnist(data.FASHION_MNIST_DIR)
    image = data.encode_png(dataset.test_images[0])
    async with running_app(Settings(model=built, threads=1)) as client:
        response = await client.post(
            "/classify", content=image, headers={"content-type": "image/png"}
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == {"name": "fashion-mnist", "version": "v1", "variant": "int8"}
    assert answer["predictions"][0]["label"] in data.FASHION_MNIST_LABELS


def test_same_version_twice_is_refused(built: Path, repository: Path, capsys) -> None:
    code = build_main([*TINY, "--out", str(repository), "--version", "v1"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_gate_fails_with_the_variant_and_threshold(
    built: Path, repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An impossible --min-accuracy; the same build runs every compression stage too."""
    argv = [*TINY, "--out", str(repository), "--version", "v2", "--min-accuracy", "0.99"]
    argv += ["--no-fp16", "--max-int8-drop", "100", "--teacher", "auto-train", "--prune", "0.5"]
    argv += ["--qat"]
    assert build_main(argv) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("blink build: accuracy gate failed: fp32 test accuracy")
    assert "below --min-accuracy 99.00%" in message
    assert os.readlink(built / "latest") == "v1"  # a failed build never becomes latest
    kept = load_bundle(built / "v2").manifest
    assert kept.provenance["gate"]["passed"] is False
    assert set(kept.variants) == {"fp32", "int8"}
    compression = kept.provenance["compression"]
    assert compression["distillation"]["teacher_params"] > kept.provenance["params"]
    assert compression["pruning"]["params_after"] < compression["pruning"]["params_before"]
    assert kept.provenance["quantization"]["qat"] == "forced by --qat"
    report = (built / "v2" / "report.md").read_text()
    assert "Distillation from auto-train" in report and "Channel pruning 50%" in report
    assert "Quantization-aware training (forced by --qat)" in report


def test_teacher_checkpoint_must_fit_the_dataset(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle's checkpoint.pt is a valid --teacher, but only for data of its shape."""
    write_image_folder(tmp_path / "pets")
    teacher = built / "v1" / "checkpoint.pt"
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "pets"), "--out", str(tmp_path)]
    assert build_main([*argv, "--teacher", str(teacher)]) == 2
    assert "was trained for [1, 10, 28, 28]" in capsys.readouterr().err


@pytest.mark.parametrize(("precision", "epochs"), [("fp32", 6), ("bf16", 18)])
def test_default_epochs_follow_the_training_arithmetic(
    precision: str, epochs: int, tmp_path: Path
) -> None:
    """Without --epochs, mixed precision trains 18 epochs and fp32 6 (both fit ~10 minutes)."""
    argv = ["--limit", "300", "--width", "4", "--calibration-images", "16", "--no-fp16"]
    argv += ["--precision", precision, "--max-int8-drop", "100", "--out", str(tmp_path)]
    assert build_main(argv) == 0
    manifest = load_bundle(tmp_path / "fashion-mnist").manifest
    assert manifest.provenance["epochs"] == epochs
    assert manifest.provenance["training"]["precision"] == precision
    report = next((tmp_path / "fashion-mnist").glob("2*/report.md")).read_text()
    assert f"{epochs} epochs in {precision}" in report


def test_qat_worse_than_static_int8_keeps_the_static_model(
    built: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Static INT8 misses an impossible gate, and QAT (here made to wreck the weights) does
    worse on the validation split: the static model stays, with the manifest's hash for it."""
    from models.publish import build_bundle as bundle_writer

    def wrecked(state, model, splits, mean, std):
        import torch

        broken = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in broken.parameters():
                parameter.zero_()
        return broken

    monkeypatch.setattr(bundle_writer, "quantization_aware", wrecked)
    argv = [*TINY, "--out", str(repository), "--version", "v4", "--no-fp16"]
    assert build_main([*argv, "--max-int8-drop", "-100"]) == 1
    bundle = load_bundle(built / "v4")
    verify_variant(bundle, "int8")  # the restored file is the one the manifest names
    quantization = bundle.manifest.provenance["quantization"]
    assert "which is kept" in quantization["qat"] and "static_int8_accuracy" not in quantization
    accuracy = bundle.manifest.metrics["int8"]["accuracy"]
    assert accuracy > 0.2  # the static model's, not the zeroed one's (one class: 10%)
