"""Real photos as camera-sized JPEGs: the request bodies of the photo benchmark.

The photos are the ones that ship in registry packages (scikit-image's `data`, scikit-learn's
sample images), resized to a target pixel count and re-encoded at quality 90, as a camera or a
phone would send them. They are written once into a cache directory as 0.bin, 1.bin, ... (the
layout bench/post_images.lua reads) and reused by later runs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

QUALITY = 90
# Label -> megapixels; "0.3MP" is a thumbnail or web upload, "12MP" a phone camera's full frame.
SIZES = {"0.3MP": 0.3, "2MP": 2.0, "12MP": 12.0}


def source_photos() -> list[np.ndarray]:
    """RGB photos of real scenes, at their own sizes."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    photos = [getattr(data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")]
    photos.append(data.stereo_motorcycle()[0])
    photos.extend(load_sample_images().images)  # china, flower
    return photos


def camera_jpeg(
    pixels: np.ndarray,
    megapixels: float,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> bytes:
    """The photo resized to about `megapixels` (aspect kept) and encoded as a quality-90 JPEG."""
    image = Image.fromarray(pixels).convert("RGB")
    scale = math.sqrt(megapixels * 1e6 / (image.width * image.height))
    size = (round(image.width * scale), round(image.height * scale))
    buffer = io.BytesIO()
    image.resize(size, resample).save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def photo_bodies(cache: Path, label: str) -> Path:
    """The directory of JPEG bodies at one size (made on first use); see `SIZES`."""
    directory = cache / f"jpeg-q{QUALITY}-{label}"
    done = directory / "count"
    if not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        photos = source_photos()
        for i, pixels in enumerate(photos):
            (directory / f"{i}.bin").write_bytes(camera_jpeg(pixels, SIZES[label]))
        done.write_text(str(len(photos)))  # written last: a partial cache is redone
    return directory


def body_count(directory: Path) -> int:
    return int((directory / "count").read_text())


def read_bodies(directory: Path) -> list[bytes]:
    return [(directory / f"{i}.bin").read_bytes() for i in range(body_count(directory))]
