"""Real photos with known ImageNet classes, from registry packages (no downloads).

scikit-image's `data` module and scikit-learn's `load_sample_images` ship a few photographs.
Each known photo lists the ImageNet labels that name what it shows; only photos whose class the
fp32 EfficientNet-Lite0 puts in its top 5 are listed, so a miss means the served path changed.
The other photos (textures, micrographs, a colour wheel) have no ImageNet class but are real
camera images: they widen INT8 calibration and the INT8-vs-fp32 agreement check.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

CAT = ("tabby, tabby cat", "tiger cat", "Egyptian cat")
KNOWN: dict[str, tuple[str, ...]] = {
    "chelsea": CAT,
    "coffee": ("espresso", "cup", "coffee mug"),
    "rocket": ("missile", "projectile, missile", "space shuttle"),
    "motorcycle": ("moped", "motor scooter, scooter"),
    "camera": ("tripod", "reflex camera"),
    "clock": ("wall clock", "analog clock"),
    "china": ("palace", "monastery", "bell cote, bell cot"),
    "flower": ("daisy",),
}
UNLABELLED = (
    "astronaut",
    "coins",
    "brick",
    "grass",
    "gravel",
    "colorwheel",
    "immunohistochemistry",
    "hubble_deep_field",
    "page",
    "text",
)


class PhotosUnavailable(Exception):
    """scikit-image or scikit-learn is not installed; the message says what to install."""


@dataclass(frozen=True)
class Photo:
    name: str
    image: Image.Image  # RGB, at the size the package ships it
    expected: tuple[str, ...]  # ImageNet labels that name it; empty when none does


def known_photos() -> list[Photo]:
    return [Photo(name, load(name), expected) for name, expected in KNOWN.items()]


def all_photos() -> list[Photo]:
    return known_photos() + [Photo(name, load(name), ()) for name in UNLABELLED]


def load(name: str) -> Image.Image:
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise PhotosUnavailable(
            "the sample photos need scikit-image and scikit-learn: "
            "pip install scikit-image scikit-learn (the project's 'dev' extra)"
        ) from None
    if name in ("china", "flower"):
        samples = load_sample_images()
        pixels = samples.images[["china", "flower"].index(name)]
    elif name == "motorcycle":
        pixels = data.stereo_motorcycle()[0]  # the left view
    else:
        pixels = getattr(data, name)()
    return Image.fromarray(np.asarray(pixels)).convert("RGB")


def augmented(images: list[Image.Image], count: int, seed: int) -> list[Image.Image]:
    """Random crops (a third to all of the area, aspect 3:4 to 4:3), flips and light jitter."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        width, height = image.size
        area = rng.uniform(0.33, 1.0) * width * height
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        crop = image.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gain = rng.uniform(0.8, 1.2)
        pixels = np.clip(np.asarray(crop, np.float32) * gain, 0, 255).astype(np.uint8)
        crops.append(Image.fromarray(pixels, "RGB"))
    return crops


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
