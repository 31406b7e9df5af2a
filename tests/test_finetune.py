"""Transfer learning: a pretrained backbone fine-tuned on a folder of photos, served over HTTP.

Fast: the folder errors (refused before any training), the augmentation, and the rebuilt
backbone computing exactly what the pretrained one computes. Slow: a tiny folder of generated
photos fine-tuned end to end (a 224x224 backbone exports, quantizes and measures in a minute or
two), the service answering each test image as the build's report says, and distillation of
the fine-tuned backbone into the small CNN.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.bundle import load_bundle
from app.engine import cpu_sums_int8_in_32_bits
from models.commands.build import main as build_main
from models.data import datasets as data
from models.data.views import ViewConfig, random_view
from tests.conftest import live_server

pretrained = pytest.importorskip("models.nets.pretrained")
try:
    pretrained.weights_path("efficientnet-lite0")
    HAVE_WEIGHTS = True
except pretrained.PretrainedUnavailable:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the 'pretrained' extra")

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
SIZES = [(96, 80), (160, 120), (64, 64), (150, 200)]
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# the frozen-feature path (--fast), with a short schedule
FAST = ["--fast", "--head-epochs", "20", "--tune-epochs", "2", "--views", "2"]
FAST += ["--calibration-images", "32"]


def write_photos(root: Path, per_class: int = 8, classes: dict = COLOURS) -> Path:
    """Noisy colour fields of several sizes and formats, one folder per colour."""
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = SIZES[i % len(SIZES)]
            noise = rng.normal(0, 40, (height, width, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            fmt = list(FORMATS)[i % len(FORMATS)]
            Image.fromarray(pixels).save(root / name / f"{i}.{FORMATS[fmt]}", fmt)
    return root


def build(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = build_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


# --- refused before anything trains ---------------------------------------------------------


def test_one_class_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_photos(tmp_path / "one", classes={"red": COLOURS["red"]})
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "one"), "--out", str(tmp_path)]
    code, line = build([*argv, "--pretrained", "efficientnet-lite0"], capsys)
    assert code == 2
    assert line.startswith("blink build: error: ") and "at least two class sub-folders" in line


def test_a_class_too_small_to_split_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_photos(tmp_path / "photos", per_class=3)
    for path in sorted((root / "red").iterdir())[1:]:
        path.unlink()
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    argv = ["--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path)]
    code, line = build([*argv, "--pretrained", "efficientnet-lite0"], capsys)
    assert code == 2
    assert "fewer than 2 readable images" in line and "red (1 readable of 2)" in line


def test_pretrained_needs_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = build(["--pretrained", "efficientnet-lite0", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--pretrained needs --dataset folder" in line


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = write_photos(tmp_path / "photos", per_class=3)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    (root / "blue" / "empty.png").write_bytes(b"")
    spec = pretrained.pretrained_spec("efficientnet-lite0").input_spec()
    dataset = data.load("folder", root, spec=spec)
    assert dataset.skipped == ["blue/empty.png", "red/broken.jpg"]
    assert dataset.train_images.shape[1:] == (224, 224, 3)
    assert len(dataset.train_labels) + len(dataset.test_labels) == 9
    assert dataset.train_sources is not None and len(dataset.train_sources) == 6


# --- the parts ------------------------------------------------------------------------------


def test_random_views_are_seeded_photos_of_the_model_size() -> None:
    context = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    views = [random_view(context, (224, 224), np.random.default_rng(1), ViewConfig())]
    views.append(random_view(context, (224, 224), np.random.default_rng(1), ViewConfig()))
    other = random_view(context, (224, 224), np.random.default_rng(2), ViewConfig())
    assert views[0].shape == (224, 224, 3) and views[0].dtype == np.uint8
    np.testing.assert_array_equal(views[0], views[1])
    assert not np.array_equal(views[0], other)
    still = ViewConfig(scale=(1, 1), ratio=(1, 1), flip=False, brightness=0, contrast=0)
    plain = random_view(context, (256, 256), np.random.default_rng(3), ViewConfig(**vars(still)))
    assert np.abs(plain.astype(int) - context).max() <= 1  # saturation 0.1 only nudges


@needs_weights
def test_rebuilt_backbone_computes_what_the_pretrained_one_does() -> None:
    import torch

    from models.nets.transfer import TransferNet
    from models.publish.pipeline import quiet_stdout

    with quiet_stdout():
        original = pretrained.load_backbone("efficientnet-lite0")
    model = TransferNet("efficientnet-lite0", ["a", "b"], tune_last=2).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = original.extract_features(x).mean((2, 3))
        actual = model.tuned(model.frozen(x))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert all(not p.requires_grad for p in model.frozen.parameters())
    assert all(p.requires_grad for p in model.tuned.parameters())


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(photo folder, bundle): the tiny folder fine-tuned with every stage of the build."""
    root = write_photos(tmp_path_factory.mktemp("photos") / "colours")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    out = tmp_path_factory.mktemp("repository")
    argv = ["--dataset", "folder", "--data-dir", str(root), "--pretrained", "efficientnet-lite0"]
    argv += ["--out", str(out), "--version", "v1", "--max-int8-drop", "100", *FAST]
    assert build_main(argv) == 0
    return root, out / "colours"


@pytest.mark.slow
@needs_weights
def test_fine_tuned_bundle_records_the_backbone_input(fine_tuned: tuple[Path, Path]) -> None:
    _, bundle = fine_tuned
    manifest = load_bundle(bundle / "latest").manifest
    backbone_input = pretrained.pretrained_spec("efficientnet-lite0").input_spec()
    # the whole frame is served (a crop can cut off what decides a label): crop fraction 1
    assert manifest.input == backbone_input.model_copy(update={"crop_fraction": 1.0})
    assert manifest.labels == list(COLOURS)
    assert set(manifest.variants) == {"fp32", "int8", "fp16"}
    provenance = manifest.provenance
    assert provenance["network"] == {"backbone": "efficientnet-lite0", "tune_last": 1}
    assert provenance["dataset"]["skipped_unreadable"] == 1
    assert provenance["dataset"]["skipped_files"] == ["red/broken.jpg"]
    assert provenance["parity_max_abs_logit_diff"] < 1e-3
    assert {"features", "head", "tune"} <= set(provenance["stages_seconds"])
    # depthwise backbones: INT8 from a bias-corrected copy, all 8 bits where the CPU allows
    quantization = provenance["quantization"]
    assert quantization["bias_correction"] is True
    assert quantization["weight_range"] == ("full" if cpu_sums_int8_in_32_bits() else "reduced")
    report = (bundle / "latest" / "report.md").read_text()
    assert "efficientnet-lite0 (ImageNet-pretrained)" in report
    assert "1 unreadable image file(s) skipped: red/broken.jpg" in report


@pytest.mark.slow
@needs_weights
def test_served_answers_match_the_reported_accuracy(fine_tuned: tuple[Path, Path]) -> None:
    """Every test photo, as its original file, over HTTP: exactly the build's int8 accuracy."""
    root, bundle = fine_tuned
    manifest = load_bundle(bundle / "latest").manifest
    dataset = data.load("folder", root, spec=manifest.input)  # the build's split (same seed)
    assert dataset.test_encoded is not None
    with live_server(bundle, threads=1) as url, httpx.Client(base_url=url, timeout=60) as client:
        answers = []
        for encoded in dataset.test_encoded:
            kind = data_kind(encoded)
            response = client.post("/classify", content=encoded, headers={"content-type": kind})
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert {a["model"]["variant"] for a in answers} == {"int8"}
    top1 = [a["predictions"][0]["index"] for a in answers]
    accuracy = float(np.mean(np.array(top1) == dataset.test_labels))
    assert round(accuracy, 6) == manifest.metrics["int8"]["accuracy"]


def data_kind(encoded: bytes) -> str:
    if encoded.startswith(b"\x89PNG"):
        return CONTENT_TYPES["png"]
    if encoded.startswith(b"\xff\xd8"):
        return CONTENT_TYPES["jpg"]
    return CONTENT_TYPES["webp"]


@pytest.mark.slow
@needs_weights
def test_fine_tuned_backbone_teaches_the_small_cnn(
    fine_tuned: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bundle = fine_tuned
    teacher = bundle / "v1" / "checkpoint.pt"
    argv = ["--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path)]
    argv += ["--teacher", str(teacher), "--epochs", "2", "--width", "4", "--no-fp16"]
    assert build_main([*argv, "--max-int8-drop", "100", "--calibration-images", "16"]) == 0
    student = load_bundle(tmp_path / "colours" / "latest").manifest
    distillation = student.provenance["compression"]["distillation"]
    assert distillation["teacher"] == str(teacher)
    assert distillation["teacher_params"] > 10 * student.provenance["params"]
    assert 0 <= distillation["teacher_val_accuracy"] <= 1
    # the small CNN keeps its own input: the folder's most common size (96x80), at full
    # resolution (its shorter side is under the cap)
    assert (student.input.height, student.input.width) == (80, 96)
