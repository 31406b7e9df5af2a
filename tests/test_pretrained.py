"""The pretrained ImageNet bundle, from `blink import --pretrained` to real photos over HTTP.

The bundle is built once per session (export, calibration, checks: minutes on two cores), so
everything here is marked slow. The photos are real: scikit-image's and scikit-learn's samples.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.bundle import load_bundle
from app.cli import main as blink
from models.data import photos
from tests.conftest import live_server

pytestmark = pytest.mark.slow
NAME = "imagenet-efficientnet-lite0"


@pytest.fixture(scope="session")
def imagenet_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("skimage")
    repository = tmp_path_factory.mktemp("imagenet")
    status = blink(["import", "--pretrained", "efficientnet-lite0", "--out", str(repository)])
    assert status == 0
    return repository


def test_bundle_has_every_variant_and_the_imagenet_input(imagenet_repository):
    bundle = load_bundle(imagenet_repository / NAME)
    manifest = bundle.manifest
    assert sorted(manifest.variants) == ["fp16", "fp32", "int8"]
    assert len(manifest.labels) == 1000 and manifest.labels[281] == "tabby, tabby cat"
    spec = manifest.input
    assert (spec.height, spec.width, spec.crop_fraction) == (224, 224, 0.875)
    assert (spec.mean, spec.std, spec.layout) == ([0.5] * 3, [0.5] * 3, "NCHW")
    assert manifest.output.kind == "logits"
    assert manifest.provenance["parity_max_abs_diff"] < 1e-4
    assert manifest.provenance["gate"]["passed"]
    known = len(photos.KNOWN)
    for variant, metrics in manifest.metrics.items():
        assert metrics["known_photos"] == known
        assert metrics["known_photos_top5"] == known, (variant, metrics["known_photo_ranks"])
    # INT8 is quantized from a bias-corrected copy: without it, agreement on these crops was 79%
    assert manifest.provenance["quantization"]["bias_correction"] is True
    # a floor for regressions, below what the import measures (its report has the figure)
    assert manifest.metrics["int8"]["top1_agreement_with_fp32"] >= 0.84
    # where fp32 is sure of its answer INT8 must keep it: the ambiguous crops are a coin toss for
    # any perturbation, even one grey level of noise (docs/own-model.md, bench/int8_agreement.py)
    assert manifest.metrics["int8"]["top1_agreement_where_fp32_confident"] >= 0.97
    assert manifest.metrics["fp16"]["top1_agreement_with_fp32"] >= 0.95
    report = (bundle.directory / "report.md").read_text()
    assert "top-1 class agrees with fp32" in report and "Accuracy: not measured" in report


@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_real_photos_over_http_have_their_class_in_the_top_5(imagenet_repository, variant):
    # max_batch_size 4: warm-up runs every batch size, and four are enough for these requests
    with live_server(
        imagenet_repository / NAME, threads=2, max_batch_size=4, model_variant=variant
    ) as url:
        for photo in photos.known_photos():
            for fmt in ("JPEG", "PNG"):
                data = photos.encode(photo.image, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                response = httpx.post(f"{url}/classify?top_k=5", content=data, timeout=30)
                assert response.status_code == 200, response.text
                top5 = [p["label"] for p in response.json()["predictions"]]
                assert set(top5) & set(photo.expected), (photo.name, fmt, top5)
        models = httpx.get(f"{url}/v1/models").json()["models"][0]
        assert models["input"]["crop_fraction"] == 0.875
        assert models["variant"] == variant
