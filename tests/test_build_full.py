"""The default build against its targets, and the served model agreeing with the build exactly.

Slow: the default build trains for minutes. Its throughput figures are benchmarks, reported by
the build and printed here, never asserted (the machine is shared and noisy).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from app.bundle import load_bundle
from models.commands.build import DEFAULT_EPOCHS
from models.commands.build import main as build_main
from models.data import datasets as data
from tests.conftest import live_server

pytestmark = [
    pytest.mark.slow,
    # the default build alone is ~10 minutes on 2 cores; more when they are shared
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
        reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)",
    ),
]


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`blink build` with no arguments but the output folder."""
    out = tmp_path_factory.mktemp("repository")
    assert build_main(["--out", str(out)]) == 0
    return out / "fashion-mnist" / "latest"


def test_default_build_meets_its_targets(default_build: Path) -> None:
    manifest = load_bundle(default_build).manifest
    provenance = manifest.provenance
    fp32, int8 = manifest.metrics["fp32"], manifest.metrics["int8"]
    speedup = int8["batch32_images_per_s"] / fp32["batch32_images_per_s"]
    print(
        f"\ndefault build: fp32 {fp32['accuracy']:.4f}, int8 {int8['accuracy']:.4f}, "
        f"params {provenance['params']}, int8 speed-up at batch 32 {speedup:.2f}x, "
        f"{provenance['epochs']} epochs in {provenance['training']['precision']}, "
        f"stages {provenance['stages_seconds']}"
    )
    # The default schedule follows the training arithmetic
    # (models/commands/build.py: DEFAULT_EPOCHS).
    mixed = provenance["training"]["precision"] != "fp32"
    assert provenance["epochs"] == DEFAULT_EPOCHS["mixed" if mixed else "fp32"]
    # The goal is 94.0%. In mixed precision the default build reaches it (94.05% with bf16 on an
    # AVX-512 BF16 CPU); the 6 fp32 epochs that fit 10 minutes elsewhere reach 92.8-92.9%. Same
    # seed, same machine: the same weights; these floors leave room for other CPUs' kernels.
    assert int8["accuracy"] >= (0.939 if mixed else 0.92)
    assert (fp32["accuracy"] - int8["accuracy"]) * 100 <= 0.3 + 1e-9
    assert provenance["params"] < 1_000_000
    assert set(manifest.variants) == {"fp32", "int8", "fp16"}


def test_served_int8_matches_the_build_on_every_test_image(default_build: Path) -> None:
    """All 10,000 test PNGs through HTTP: the served top-1 accuracy is exactly the build's."""
    manifest = load_bundle(default_build).manifest
    dataset = data.load_fashion_mnist(data.FASHION_MNIST_DIR)
    images = [data.encode_png(image) for image in dataset.test_images]
    with live_server(default_build, threads=1) as url:
        top1 = asyncio.run(classify_all(url, images))
    assert all(answer["variant"] == "int8" for answer in top1)
    correct = sum(
        answer["index"] == label for answer, label in zip(top1, dataset.test_labels, strict=True)
    )
    assert correct / len(images) == manifest.metrics["int8"]["accuracy"]


async def classify_all(url: str, images: list[bytes], concurrency: int = 16) -> list[dict]:
    """POST every image (a few at a time, so the server batches), keep each top-1 answer."""
    answers: list[dict] = [{}] * len(images)
    queue = iter(range(len(images)))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in queue:
                response = await post_png(client, images[i])
                body = response.json()
                answers[i] = {**body["predictions"][0], "variant": body["model"]["variant"]}

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def post_png(client: httpx.AsyncClient, image: bytes, attempts: int = 3) -> httpx.Response:
    """POST one PNG; a connection the server closed as idle just as it was reused is retried
    (classifying is idempotent), any HTTP error status is not."""
    for attempt in range(attempts):
        try:
            response = await client.post(
                "/classify", content=image, headers={"content-type": "image/png"}
            )
            return response.raise_for_status()
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def test_latest_is_a_relative_symlink(default_build: Path) -> None:
    assert default_build.is_symlink() and not os.readlink(default_build).startswith("/")
