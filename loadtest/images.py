"""Request bodies: Fashion-MNIST test images encoded as PNG, JPEG and upscaled 512x512 JPEG.

Real images, not noise: decode cost and the model's accuracy both depend on the content. Without
the dataset the load test stops with a message saying how to get it.
"""

from __future__ import annotations

import gzip
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATA_DIR = Path(os.environ.get("BLINK_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"
BIG_SIDE = 512
JPEG_QUALITY = 90


class DatasetMissing(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Body:
    kind: str  # "png", "jpeg" or "jpeg512": the request name in Locust's statistics
    data: bytes
    content_type: str
    truth: int  # the ground-truth class index


def dataset_files(data_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    images, labels = data_dir / IMAGES, data_dir / LABELS
    missing = [str(p) for p in (images, labels) if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST test set not found ({', '.join(missing)}). Install the Debian "
            "package dataset-fashion-mnist (scripts/setup.sh does), or point "
            "BLINK_FASHION_MNIST_DIR at a directory holding the two idx.gz files."
        )
    return images, labels


def load_test_set(count: int, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images (uint8, N x 28 x 28) and their class indices."""
    images_path, labels_path = dataset_files(data_dir)
    # idx format: a big-endian header (16 bytes for images, 8 for labels), then raw uint8
    images = np.frombuffer(gzip.decompress(images_path.read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress(labels_path.read_bytes()), np.uint8, offset=8)
    return images.reshape(-1, 28, 28)[:count], labels[:count]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_bodies(count: int = 600, big_count: int = 60, data_dir: Path = DATA_DIR) -> list[Body]:
    """PNG and JPEG bodies of `count` images, and 512x512 JPEGs of the first `big_count`."""
    images, labels = load_test_set(count, data_dir)
    bodies = []
    for i, (pixels, truth) in enumerate(zip(images, labels, strict=True)):
        image = Image.fromarray(pixels, "L")
        bodies.append(Body("png", encode(image, "PNG"), "image/png", int(truth)))
        bodies.append(Body("jpeg", encode(image, "JPEG"), "image/jpeg", int(truth)))
        if i < big_count:
            big = image.resize((BIG_SIDE, BIG_SIDE), Image.Resampling.BILINEAR)
            bodies.append(Body("jpeg512", encode(big, "JPEG"), "image/jpeg", int(truth)))
    return bodies


class BodyPicker:
    """Random bodies: a `big_share` of them 512x512 JPEGs, the rest PNG and JPEG half and half."""

    def __init__(self, bodies: list[Body], big_share: float, seed: int | None = None) -> None:
        self.small = [b for b in bodies if b.kind != "jpeg512"]
        self.big = [b for b in bodies if b.kind == "jpeg512"]
        self.big_share = big_share if self.big else 0.0
        self.random = random.Random(seed)

    def __call__(self) -> Body:
        pool = self.big if self.random.random() < self.big_share else self.small
        return self.random.choice(pool)
