"""What `blink import` reads besides the model: labels, image folders, and normalisation flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from models.publish.pipeline import BuildError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
# --mean/--std presets: (x/255 - mean) / std lands the pixels where each convention wants them.
NORMALISATION = {
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # torchvision, timm
    "inception": ([0.5] * 3, [0.5] * 3),  # [-1, 1]: Inception, EfficientNet-Lite, MobileNet (TF)
    "unit": ([0.0] * 3, [1.0] * 3),  # [0, 1]
    "raw": ([0.0] * 3, [1 / 255] * 3),  # [0, 255]: Keras models with preprocessing inside
}


def read_labels(path: Path) -> list[str]:
    """One label per line, or JSON: a list, or a mapping from class index to name."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read labels from {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        labels = labels_from_json(text, path)
    else:
        labels = text.rstrip("\n\r\t ").splitlines()
        labels = [label.strip() for label in labels]
        if "" in labels:
            raise BuildError(f"{path}: line {labels.index('') + 1} is empty; one label per line")
    if not labels:
        raise BuildError(f"{path} holds no labels")
    return labels


def labels_from_json(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        try:
            indexed = {int(key): value for key, value in data.items()}
        except ValueError:
            raise BuildError(f"{path}: keys must be class indices (0, 1, ...)") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise BuildError(f"{path}: class indices must run from 0 to {len(indexed) - 1}")
        data = [indexed[i] for i in range(len(indexed))]
    if not isinstance(data, list) or not all(isinstance(v, str) and v for v in data):
        raise BuildError(f"{path}: expected a list of names or an index -> name mapping")
    return data


def normalisation(value: str | None, channels: int, default: str, flag: str) -> list[float]:
    """A preset name or comma-separated numbers (one, or one per channel)."""
    mean_or_std = 0 if flag == "--mean" else 1
    text = value or default
    if text in NORMALISATION:
        return NORMALISATION[text][mean_or_std][:channels]
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        raise BuildError(
            f"{flag} {text!r}: give {channels} comma-separated numbers or a preset "
            f"({', '.join(NORMALISATION)})"
        ) from None
    if len(numbers) == 1:
        numbers *= channels
    if len(numbers) != channels:
        raise BuildError(f"{flag} has {len(numbers)} values; the input has {channels} channels")
    return numbers


def parse_size(text: str) -> tuple[int, int]:
    """`224` or `HxW` (`240x320`) as (height, width)."""
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match or int(match[1]) < 1 or (match[2] and int(match[2]) < 1):
        raise BuildError(f"--size {text!r}: give N or HxW, e.g. 224 or 240x320")
    height = int(match[1])
    return height, int(match[2]) if match[2] else height


def image_files(directory: Path, flag: str) -> list[Path]:
    if not directory.is_dir():
        raise BuildError(f"{flag} {directory}: not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BuildError(f"{flag} {directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def calibration_files(directory: Path, count: int, seed: int) -> list[Path]:
    files = image_files(directory, "--calibrate")
    if len(files) <= count:
        return files
    pick = np.sort(np.random.default_rng(seed).permutation(len(files))[:count])
    return [files[i] for i in pick]


def labelled_folders(directory: Path, labels: list[str]) -> tuple[list[Path], np.ndarray]:
    """Images of a class-per-folder tree, with the class index their folder's name matches."""
    files = image_files(directory, "--eval")
    index = label_index(labels)
    loose = [f.name for f in files if f.parent == directory]
    if loose:
        raise BuildError(f"--eval {directory}: {loose[0]} is not inside a class folder")
    folders = {f.relative_to(directory).parts[0] for f in files}
    classes = {name: index.get(name, index.get(normalise(name))) for name in folders}
    unmatched = sorted(name for name, i in classes.items() if i is None)
    if unmatched:
        raise BuildError(
            f"--eval {directory}: folders {', '.join(unmatched[:5])} match no label "
            "(folder names are matched to labels, case and '_'/'-' vs ' ' ignored)"
        )
    answers = [classes[f.relative_to(directory).parts[0]] for f in files]
    return files, np.asarray(answers, np.int64)


def label_index(labels: list[str]) -> dict[str, int]:
    """Folder names that name each label: the label, its normalised form, each synonym."""
    index: dict[str, int] = {}
    for i, label in enumerate(labels):
        for name in (label, *label.split(",")):
            index.setdefault(normalise(name), i)
        index[label] = i
    return index


def normalise(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().lower()
