"""Photo augmentation for fine-tuning: random resized crop, horizontal flip, colour jitter.

Each view is cut from a decoded "context" image a little larger than the model input (the
region the service's centre crop is taken from), so a view of scale 1 is the served image and
smaller scales zoom in. Pillow resizes, numpy jitters; one seeded generator makes it repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ViewConfig:
    # Area fraction of the context image a crop keeps. Not much below one half: a crop must
    # still show a small defect or object that decides the label.
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.1  # each factor drawn from [1 - x, 1 + x]
    contrast: float = 0.1
    saturation: float = 0.1


def random_view(
    context: np.ndarray, size: tuple[int, int], rng: np.random.Generator, config: ViewConfig
) -> np.ndarray:
    """One augmented uint8 [H, W, 3] view of a uint8 [h, w, 3] context image; size is (H, W)."""
    box = crop_box(context.shape[1], context.shape[0], rng, config)
    image = Image.fromarray(context).resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    pixels = np.asarray(image, dtype=np.float32)
    if config.flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return jitter(pixels, rng, config)


def crop_box(
    width: int, height: int, rng: np.random.Generator, config: ViewConfig
) -> tuple[float, float, float, float]:
    """A random box of the configured area and aspect range, wholly inside the image."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*config.scale)
        aspect = math.exp(rng.uniform(math.log(config.ratio[0]), math.log(config.ratio[1])))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    return (0.0, 0.0, float(width), float(height))


def jitter(pixels: np.ndarray, rng: np.random.Generator, config: ViewConfig) -> np.ndarray:
    """Brightness, contrast and saturation, each scaled by a random factor near 1."""
    pixels = pixels * rng.uniform(1 - config.brightness, 1 + config.brightness)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(1 - config.contrast, 1 + config.contrast) + mean
    grey = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    factor = rng.uniform(1 - config.saturation, 1 + config.saturation)
    pixels = (pixels - grey[..., None]) * factor + grey[..., None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
