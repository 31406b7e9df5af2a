"""What the model answers, watched: prediction counts, top-1 scores, low-confidence answers and
drift against the bundle's reference, against the real app and a real bundle."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.bundle import load_bundle
from app.engine import Engine
from app.monitor import js_distance
from app.postprocess import calibrated_scores
from app.preprocess import Preprocessor
from app.settings import Settings
from tests.conftest import running_app
from tests.images import encode, png
from tests.metrics_text import parse, value
from tests.onnx_models import copy_with_reference

PNG = {"content-type": "image/png"}


def test_js_distance_reads_0_for_the_same_mix_and_1_for_nothing_in_common():
    p = np.array([0.2, 0.3, 0.5])
    assert js_distance(p, p * 10) == pytest.approx(0, abs=1e-9)  # counts or shares alike
    assert js_distance(np.array([1.0, 0, 0]), np.array([0, 0.5, 0.5])) == pytest.approx(1)
    assert 0 < js_distance(p, np.array([0.3, 0.3, 0.4])) < 0.2


def outputs_of(bundle_dir: Path, bodies: list[bytes]) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    preprocessor = Preprocessor(bundle.manifest.input, 10**7)
    engine = Engine(bundle, device="cpu", variant="fp32", threads=1)
    tensors = [preprocessor.to_tensor(preprocessor.open_image(b)) for b in bodies]
    return engine.run(np.concatenate(tensors))


def with_reference(tmp_path: Path, bundle_dir: Path, outputs: np.ndarray) -> Path:
    return copy_with_reference(bundle_dir, tmp_path / "referenced" / "1", outputs)


@pytest.fixture
def referenced(tmp_path: Path, bundle_dir: Path) -> Path:
    """The test bundle with a reference measured on its own answers to 200 images."""
    return with_reference(
        tmp_path, bundle_dir, outputs_of(bundle_dir, [png(s) for s in range(200)])
    )


async def flushed_metrics(client: httpx.AsyncClient) -> dict:
    registry = client.app.state.registry  # type: ignore[attr-defined]
    for host in registry.hosts.values():
        host.current.monitor.flush()  # what the registry does every second
    return parse((await client.get("/metrics")).text)


async def test_answers_are_counted_by_label_with_their_top_scores(referenced):
    seeds = range(300, 340)
    expected = calibrated_scores(outputs_of(referenced, [png(s) for s in seeds]))
    settings = Settings(model=referenced, threads=1, model_variant="fp32", drift_window=30)
    async with running_app(settings) as client:
        for seed in seeds:
            response = await client.post("/classify", content=png(seed), headers=PNG)
            assert response.status_code == 200
        samples = await flushed_metrics(client)
        monitor = client.app.state.registry.default.current.monitor  # type: ignore[attr-defined]
    labels = load_bundle(referenced).manifest.labels
    counts = np.bincount(expected.argmax(1), minlength=len(labels))
    for label, count in zip(labels, counts, strict=True):
        assert value(samples, "blink_predictions_total", label=label) == count
    top = expected.max(1)
    assert value(samples, "blink_top_score_count") == len(seeds)
    assert value(samples, "blink_top_score_sum") == pytest.approx(top.sum(), rel=1e-5)
    assert value(samples, "blink_low_confidence_answers_total") == (top < 0.5).sum()
    assert value(samples, "blink_drift_window_answers") == 30  # the window's size at most
    # the window against the reference, as computed here
    reference = load_bundle(referenced).manifest.reference
    window = expected[-30:]
    mix = np.bincount(window.argmax(1), minlength=len(labels)).astype(float)
    drift = js_distance(mix, np.asarray(reference.class_frequencies))
    assert value(samples, "blink_drift_class_mix") == pytest.approx(drift, abs=1e-9)
    assert monitor.class_drift == pytest.approx(drift, abs=1e-9)
    assert 0 <= value(samples, "blink_drift_confidence") <= 1
    ratio = value(samples, "blink_reference_low_confidence_ratio")
    assert ratio == reference.low_confidence_rate


def varied(seed: int) -> bytes:
    """Grey images of varied brightness and contrast: the tiny model answers several classes."""
    rng = np.random.default_rng(seed)
    base, spread = rng.integers(0, 256), rng.integers(0, 128)
    pixels = np.clip(base + rng.integers(-spread, spread + 1, (28, 28)), 0, 255)
    return encode(Image.fromarray(pixels.astype(np.uint8), "L"), "PNG")


async def test_one_class_traffic_drifts_far_from_the_reference_and_its_own_mix_does_not(
    tmp_path, bundle_dir
):
    images = [varied(s) for s in range(200)]
    outputs = outputs_of(bundle_dir, images)
    referenced = with_reference(tmp_path, bundle_dir, outputs)
    answers = calibrated_scores(outputs).argmax(1)
    counts = np.bincount(answers)
    rarest = int(np.flatnonzero(counts).tolist()[counts[counts > 0].argmin()])
    assert counts[rarest] < len(images) / 2  # a mix unlike the reference's
    one_class = [body for body, a in zip(images, answers, strict=True) if a == rarest]
    settings = Settings(model=referenced, threads=1, model_variant="fp32", drift_window=len(images))
    async with running_app(settings) as client:
        for body in images:  # the reference's own images: its own mix
            await client.post("/classify", content=body, headers=PNG)
        same = value(await flushed_metrics(client), "blink_drift_class_mix")
        for _ in range(200 // len(one_class) + 1):
            for body in one_class:
                await client.post("/classify", content=body, headers=PNG)
        shifted = value(await flushed_metrics(client), "blink_drift_class_mix")
    assert same == pytest.approx(0, abs=1e-9)
    assert shifted > 0.5


async def test_cache_hits_are_not_counted_again_and_no_reference_means_no_drift(bundle_dir):
    settings = Settings(model=bundle_dir, threads=1, cache_bytes=1 << 20)
    async with running_app(settings) as client:
        for _ in range(5):
            await client.post("/classify", content=png(1), headers=PNG)
        samples = await flushed_metrics(client)
    assert value(samples, "blink_predictions_total") == 1  # one computed, four from the cache
    assert value(samples, "blink_cache_lookups_total", result="hit") == 4
    assert not [key for key in samples if key[0].startswith("blink_drift_class")]
    assert value(samples, "blink_drift_window_answers") == 1


async def test_monitoring_off_counts_nothing(bundle_dir):
    async with running_app(Settings(model=bundle_dir, threads=1, monitor=False)) as client:
        for seed in range(3):
            assert (await client.post("/classify", content=png(seed), headers=PNG)).is_success
        samples = await flushed_metrics(client)
    assert value(samples, "blink_predictions_total") == 0
    assert value(samples, "blink_top_score_count") == 0
