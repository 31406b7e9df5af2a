"""`blink build --dataset folder`: candidates within a budget, calibrated scores, served.

Fast: the one-line refusals (each before anything trains), a whole-network fine-tune of a
pretrained backbone stepping through the training loop, and one tiny folder built end to end
with the from-scratch candidate. Slow: a folder whose label is a small mark near an edge,
built, served over HTTP, every test image's answer, score and prediction set compared with
what the build computed and recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.bundle import load_bundle
from app.engine import Engine
from app.postprocess import prediction_set_indices, row_scores
from app.preprocess import Preprocessor
from models.commands.build import main as build_main
from models.data import datasets as data
from models.evaluate import calibration as calib
from tests.conftest import live_server

COLOURS = {"amber": (200, 140, 30), "moss": (70, 130, 50), "slate": (70, 90, 140)}
# 40 per class: 8 test images each, 96 to train on, of which 10 validate and 10 calibrate
PER_CLASS = 40
TINY = ["--epochs", "3", "--budget", "1", "--calibration-images", "16", "--no-fp16"]
TINY += ["--max-int8-drop", "100"]


def write_colours(
    root: Path, per_class: int = PER_CLASS, size: tuple[int, int] = (48, 40), jitter: float = 55
) -> Path:
    """Noisy colour fields, `size` (width, height), one folder per colour, PNG and JPEG. Each
    image's colour strays from its class's by `jitter` (standard deviation per channel), so
    the classes overlap a little and a model's scores have something to be calibrated on."""
    rng = np.random.default_rng(0)
    width, height = size
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            tint = np.array(colour) + rng.normal(0, jitter, 3)
            noise = rng.normal(0, 30, (height, width, 3))
            pixels = np.clip(tint + noise, 0, 255).astype(np.uint8)
            if i % 2:
                Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=92)
            else:
                Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def folder_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "folder", "--data-dir", str(root), "--out", str(out), *extra]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run the build, expecting exit 2 and one error line: (that line, all of stderr)."""
    code = build_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[build] ")]
    assert len(lines) == 1, err  # one line: no traceback, no usage text
    assert lines[0].startswith("blink build: error: ")
    return lines[0], err


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colours(tmp_path_factory.mktemp("photos") / "colours")


# --- refused, with one line, before anything trains -----------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coverage", "1.5"], "--coverage: coverage levels must be in (0, 1), not 1.5"),
        (["--coverage", "0"], "--coverage: coverage levels must be in (0, 1), not 0"),
        (["--coverage", "0.9,x"], "--coverage: 'x' is not a number"),
        (["--budget", "0"], "--budget must be a positive number of minutes, not 0.0"),
        (["--budget", "-3"], "--budget must be a positive number of minutes"),
        (["--fast"], "--fast needs --dataset folder"),
    ],
)
def test_bad_flags_are_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line, _ = refused([*flags, "--out", str(tmp_path)], capsys)
    assert message in line
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_candidate_names_the_choices(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line, _ = refused(folder_argv(colours, tmp_path, "--candidates", "scratch,nosuch"), capsys)
    assert "--candidates 'scratch,nosuch': choose from " in line and "scratch" in line
    line, _ = refused(folder_argv(colours, tmp_path, "--candidates", " , "), capsys)
    assert "choose from" in line


def test_a_budget_too_small_for_any_candidate(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = folder_argv(colours, tmp_path, "--candidates", "scratch", "--budget", "0.001")
    line, _ = refused(argv, capsys)
    assert "a budget of 0.0 min fits no candidate (scratch: does not fit: 3 epochs" in line
    assert line.endswith("raise --budget")
    assert not (tmp_path / "colours").exists()


def test_a_level_the_calibration_split_cannot_support(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit --coverage 0.99 needs 99 calibration images; the folder holds 10. Refused
    as soon as the splits are known, not after training."""
    argv = folder_argv(colours, tmp_path, "--candidates", "scratch", "--coverage", "0.9,0.99")
    line, err = refused(argv, capsys)
    assert line == (
        "blink build: error: too few images for the calibration split: coverage 0.99 needs at "
        "least 99, the split holds 10 (raise --calibration-split or add images)"
    )
    assert "[build] candidates..." not in err  # nothing trained
    assert not (tmp_path / "colours").exists()


# --- a pretrained backbone fine-tuned whole --------------------------------------------------


def test_whole_network_fine_tune_steps_with_discriminative_rates(tmp_path: Path) -> None:
    pretrained = pytest.importorskip("models.nets.pretrained")
    try:
        pretrained.weights_path("efficientnet-lite0")
    except pretrained.PretrainedUnavailable:
        pytest.skip("needs the 'pretrained' extra (efficientnet-lite0 weights)")
    import torch

    from models.nets import transfer
    from models.train import candidates as cands
    from models.train import loop as train

    root = write_colours(tmp_path / "colours", per_class=6, size=(64, 64))
    scratch = data.pixel_spec("RGB", 64, 64)
    spec = cands.backbone_spec("efficientnet-lite0", scratch)
    assert (spec.height, spec.width, spec.crop_fraction) == (64, 64, 1.0)  # the whole frame
    dataset = data.load("folder", root, spec=spec)
    everything = transfer.layer_count("efficientnet-lite0")
    torch.manual_seed(0)
    model = transfer.TransferNet("efficientnet-lite0", dataset.labels, everything, pool="avgmax")
    assert len(model.frozen) == 0
    assert all(p.requires_grad for p in model.parameters())
    config = train.TrainConfig(
        epochs=1, batch_size=4, lr=1e-3, pad=2, pad_mode="reflect", precision="fp32", quiet=True
    )
    optimizer = train.make_optimizer(model, config)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(rate) == len(list(model.parameters()))  # every parameter is trained
    stem = model.tuned[0][0].weight
    head = model.classifier.weight
    assert rate[id(head)] == config.lr
    assert rate[id(stem)] == pytest.approx(config.lr * transfer.EARLY_LAYER_LR)
    assert rate[id(head)] > rate[id(stem)]
    layers = [list(layer.parameters()) for layer in model.tuned]
    by_layer = [rate[id(parameters[0])] for parameters in layers if parameters]
    assert by_layer == sorted(by_layer)  # rising from the first layer to the last
    before = {"stem": stem.detach().clone(), "head": head.detach().clone()}
    images, labels = dataset.train_images, dataset.train_labels
    trained, history = train.train(
        model, (images[:8], labels[:8]), (images[8:], labels[8:]), spec.mean, spec.std, config
    )
    assert len(history) == 1 and np.isfinite(history[0].train_loss)
    assert not torch.equal(trained.tuned[0][0].weight, before["stem"])  # the first layer moved
    assert not torch.equal(trained.classifier.weight, before["head"])
    with torch.no_grad():
        assert trained(torch.zeros(2, 3, 64, 64)).shape == (2, len(COLOURS))


def test_frozen_batch_norm_keeps_its_statistics_while_the_weights_learn() -> None:
    """--batch-norm frozen: training mode leaves every batch norm in eval mode, so a training
    forward pass uses and keeps ImageNet's statistics; "train" re-estimates them."""
    pretrained = pytest.importorskip("models.nets.pretrained")
    try:
        pretrained.weights_path("efficientnet-lite0")
    except pretrained.PretrainedUnavailable:
        pytest.skip("needs the 'pretrained' extra (efficientnet-lite0 weights)")
    import torch
    from torch import nn

    from models.nets import transfer

    everything = transfer.layer_count("efficientnet-lite0")
    batch = torch.randn(2, 3, 32, 32) * 3 + 1
    statistics = {}
    for mode in ("train", "frozen"):
        model = transfer.TransferNet("efficientnet-lite0", ["a", "b"], everything, pool="avgmax")
        model.batch_norm = mode
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        before = [n.running_mean.clone() for n in norms]
        model.train()
        assert model.training and all(n.training == (mode == "train") for n in norms)
        model(batch)
        statistics[mode] = [
            torch.equal(n.running_mean, old) for n, old in zip(norms, before, strict=True)
        ]
    assert all(statistics["frozen"]) and not any(statistics["train"])


# --- a tiny folder built end to end ----------------------------------------------------------


@pytest.fixture(scope="module")
def folder_build(colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The from-scratch candidate on the colour fields, 3 epochs, prediction sets at 50% and
    80% (the 10-image calibration split supports both)."""
    out = tmp_path_factory.mktemp("repository")
    argv = folder_argv(colours, out, "--candidates", "scratch", "--coverage", "0.5,0.8", *TINY)
    assert build_main([*argv, "--version", "v1"]) == 0
    return out / "colours" / "latest"


def test_folder_build_is_calibrated(folder_build: Path) -> None:
    manifest = load_bundle(folder_build).manifest
    assert manifest.labels == sorted(COLOURS)
    spec = manifest.input
    # the images' own size (48x40, under the cap), whole frame, colour kept
    assert (spec.height, spec.width, spec.color, spec.crop_fraction) == (40, 48, "RGB", 1.0)
    assert set(manifest.variants) == {"fp32", "int8"}
    calibration = manifest.calibration
    assert calibration is not None
    low, high = calib.TEMPERATURE_RANGE
    assert low < calibration.temperature < high  # fitted, not stuck at a bound of its search
    assert set(calibration.thresholds) == {"0.5", "0.8"}
    assert all(0 <= t <= 1 for t in calibration.thresholds.values())
    assert set(calibration.coverage) == set(calibration.mean_set_size) == {"0.5", "0.8"}
    assert calibration.images == 10
    assert "calibration split (10 images)" in calibration.split
    assert "validation split (10 images)" in calibration.split
    assert "int8 outputs" in calibration.split  # fitted on what the service answers with
    assert calibration.ece_before is not None and calibration.ece_after is not None
    provenance = manifest.provenance
    training = provenance["training"]
    assert training["candidates"] == ["scratch"] and training["chosen"] == "scratch"
    assert training["budget_minutes"] == 1.0
    assert training["calibration_split"] == 0.1 and training["val_split"] == 0.1
    network = provenance["network"]
    assert network == {
        "candidate": "scratch",
        "width": 16,
        "depth": 1,
        "stem_stride": 1,
        "head": "flatten",
    }
    assert provenance["epochs"] <= 3


def test_folder_build_report_has_candidates_and_calibration(folder_build: Path) -> None:
    report = (folder_build / "report.md").read_text()
    assert "## Candidates" in report and "Tried within a budget of 1 min" in report
    (row,) = [line for line in report.splitlines() if line.startswith("| scratch |")]
    assert "48x40 RGB" in row and "**chosen**" in row
    assert "## Calibration and prediction sets" in report
    assert "| 50% |" in report and "| 80% |" in report
    assert "Input 48x40: the most common image size" in report
    raw = json.loads((folder_build / "manifest.json").read_text())
    assert set(raw["calibration"]["thresholds"]) == {"0.5", "0.8"}


# --- slow: a detail-dependent label, built, served, checked answer by answer -----------------

MARK = 4  # side of the bright square that makes an image "marked"
SIDE = 80


def write_marked(root: Path, per_class: int = 60) -> Path:
    """Two classes of the same grey noise texture; "marked" has a small bright square near a
    random edge, which only a detail-preserving network can see."""
    rng = np.random.default_rng(0)
    for name in ("marked", "plain"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(110, 25, (SIDE, SIDE)), 0, 255)
            if name == "marked":
                along = int(rng.integers(2, SIDE - MARK - 2))
                inset = int(rng.integers(2, 8))
                edge = int(rng.integers(4))
                top, left = {
                    0: (inset, along),
                    1: (SIDE - MARK - inset, along),
                    2: (along, inset),
                    3: (along, SIDE - MARK - inset),
                }[edge]
                pixels[top : top + MARK, left : left + MARK] = 255
            Image.fromarray(pixels.astype(np.uint8), "L").save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_answers_and_sets_are_what_the_build_recorded(tmp_path: Path) -> None:
    root = write_marked(tmp_path / "marks")
    out = tmp_path / "repository"
    argv = folder_argv(root, out, "--candidates", "scratch", "--budget", "1.5", "--epochs", "12")
    argv += ["--coverage", "0.8,0.9", "--calibration-images", "64", "--no-fp16"]
    assert build_main([*argv, "--max-int8-drop", "100", "--version", "v1"]) == 0
    bundle_dir = out / "marks" / "latest"
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert manifest.input.color == "L" and (manifest.input.height, manifest.input.width) == (
        SIDE,
        SIDE,
    )
    assert manifest.provenance["network"]["head"] == "avgmax"  # beyond 64 px
    calibration = manifest.calibration
    assert calibration is not None and set(calibration.thresholds) == {"0.8", "0.9"}
    # the build's test split, reproduced: same loader, same seed and fraction
    dataset = data.load("folder", root, test_split=0.2, seed=0)
    assert dataset.test_encoded is not None
    labels = dataset.test_labels
    # what the build computed for the served variant: engine outputs, calibrated as served
    engine = Engine(bundle, device="cpu", variant="int8", threads=1)
    preprocess = Preprocessor(manifest.input)
    expected = [
        row_scores(engine.run(preprocess(encoded))[0], temperature=calibration.temperature)
        for encoded in dataset.test_encoded
    ]
    answers: dict[str, list[dict]] = {"0.8": [], "0.9": []}
    with (
        live_server(bundle_dir, threads=1) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        for encoded in dataset.test_encoded:
            for level in answers:
                response = client.post(
                    "/classify",
                    params={"coverage": level, "top_k": 2},
                    content=encoded,
                    headers={"content-type": "image/png"},
                )
                assert response.status_code == 200, response.text
                answers[level].append(response.json())
    for level, served in answers.items():
        threshold = calibration.thresholds[level]
        covered = []
        for answer, scores, label in zip(served, expected, labels, strict=True):
            assert answer["model"]["variant"] == "int8"
            top = answer["predictions"]
            assert [p["index"] for p in top] == np.argsort(-scores, kind="stable")[:2].tolist()
            assert [p["score"] for p in top] == pytest.approx(
                [scores[p["index"]] for p in top], rel=1e-12
            )
            members = answer["prediction_set"]["indices"]
            assert members == prediction_set_indices(scores, threshold)
            covered.append(int(label) in members)
        # exactly the coverage the build measured and recorded for this level
        assert round(float(np.mean(covered)), 6) == calibration.coverage[level]
    top1 = np.array([a["predictions"][0]["index"] for a in answers["0.9"]])
    accuracy = float(np.mean(top1 == labels))
    assert round(accuracy, 6) == manifest.metrics["int8"]["accuracy"]
    # the mark is learnt, not guessed: well above the 50% of a coin
    assert accuracy >= 0.75, (accuracy, manifest.provenance["training"])
