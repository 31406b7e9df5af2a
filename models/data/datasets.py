"""Datasets as in-memory uint8 arrays: Fashion-MNIST (idx), CIFAR-10 (python pickles), folders.

Every loader returns a `Dataset`: train and test images as uint8 [N, H, W, C], integer labels,
class names, the colour mode, and the sha256 of each source file for the bundle's provenance.
Anything missing or malformed raises `DatasetError` with a message that says what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.bundle import InputSpec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_FILES = [*CIFAR_TRAIN, "test_batch", "batches.meta"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
GREY_MODES = {"1", "L", "LA", "I", "I;16"}
# A folder is served at its images' own resolution, shrunk only where the shorter side exceeds
# this: detail that decides a label (a scratch, a small defect) must survive preprocessing, and
# past this size training time grows faster than what a small CNN or a backbone resolves.
FOLDER_MAX_SHORT_SIDE = 320
# Images whose channels differ by at most this much everywhere are grey content saved as RGB
# (JPEG encoders and screenshot tools often do): they are decoded as one channel.
GREY_TOLERANCE = 2


class DatasetError(Exception):
    """A dataset that is missing or cannot be read; the message says what was expected."""


@dataclass
class Dataset:
    name: str
    labels: list[str]
    color: str  # "L" or "RGB", as the bundle's input spec
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, str] = field(default_factory=dict)  # source file -> sha256
    # Encoded originals of the test images (folder datasets), so evaluation decodes exactly
    # what a client would send; None means "PNG-encode test_images".
    test_encoded: list[bytes] | None = None
    # Folder datasets: the source file of each training image (a teacher or an augmentation
    # decodes them again at its own size) and the files skipped as unreadable.
    train_sources: list[Path] | None = None
    skipped: list[str] = field(default_factory=list)
    # Folder datasets: how the input size and colour were chosen, for the report
    input_note: str = ""

    @property
    def channels(self) -> int:
        return self.train_images.shape[3]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.train_images.shape[1], self.train_images.shape[2]

    @property
    def sha256(self) -> str:
        """One digest over every source file's digest, independent of the order they were read."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}\0{self.files[name]}\n".encode())
        return digest.hexdigest()


def load(
    kind: str,
    data_dir: Path | None,
    *,
    test_split: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    spec: InputSpec | None = None,
) -> Dataset:
    if kind == "fashion-mnist":
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    if data_dir is None:
        raise DatasetError(f"--dataset {kind} needs --data-dir")
    if kind == "cifar10":
        return load_cifar10(data_dir)
    if kind == "folder":
        return load_folder(
            data_dir, test_split=test_split, seed=seed, image_size=image_size, spec=spec
        )
    raise DatasetError(f"unknown dataset kind {kind!r}")


# --- Fashion-MNIST: idx files -------------------------------------------------------------


def load_fashion_mnist(directory: Path) -> Dataset:
    paths = {key: find_idx_file(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] + ".gz" for key, path in paths.items() if path is None]
    if missing:
        where = "not found" if not directory.exists() else f"missing {', '.join(missing)} in it"
        raise DatasetError(
            f"Fashion-MNIST not found: {directory} {where}. Install Debian's package "
            "(apt-get install dataset-fashion-mnist, which puts the idx.gz files in "
            f"{FASHION_MNIST_DIR}) or pass --data-dir with the four *-ubyte.gz files"
        )
    found = cast("dict[str, Path]", paths)  # none is None past the check above
    raw = {key: path.read_bytes() for key, path in found.items()}
    arrays = {
        key: parse_idx(data, 3 if key.endswith("images") else 1, found[key].name)
        for key, data in raw.items()
    }
    for part in ("train", "test"):
        check_pairs(
            arrays[f"{part}_images"],
            arrays[f"{part}_labels"],
            found[f"{part}_images"],
            found[f"{part}_labels"],
        )
        check_label_range(
            arrays[f"{part}_labels"], len(FASHION_MNIST_LABELS), found[f"{part}_labels"].name
        )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DatasetError(
            f"train images are {arrays['train_images'].shape[1:]} "
            f"but test images {arrays['test_images'].shape[1:]}"
        )
    return Dataset(
        name="fashion-mnist",
        labels=list(FASHION_MNIST_LABELS),
        color="L",
        train_images=arrays["train_images"][..., None],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"][..., None],
        test_labels=arrays["test_labels"].astype(np.int64),
        files={found[key].name: sha256_bytes(data) for key, data in raw.items()},
    )


def find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def parse_idx(data: bytes, dims: int, name: str = "") -> np.ndarray:
    """An idx file (gzip-compressed or not) of unsigned bytes with `dims` dimensions."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{name or 'idx file'} is not a valid gzip file: {exc}") from exc
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetError(f"{name or 'idx file'} is too short to be an idx file")
    zero, dtype_code, found_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or found_dims != dims:
        raise DatasetError(
            f"{name or 'idx file'} is not an idx file of unsigned bytes with {dims} dimension(s) "
            f"(magic {data[:4].hex()}, expected 0000080{dims})"
        )
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetError(
            f"{name or 'idx file'} says {shape} ({expected} bytes) but holds {len(data) - header}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def check_pairs(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path.name} has {len(images)} images but {label_path.name} "
            f"has {len(labels)} labels"
        )
    if len(images) == 0:
        raise DatasetError(f"{image_path.name} holds no images")


def check_label_range(labels: np.ndarray, classes: int, path: Path | str) -> None:
    if len(labels) and int(labels.max()) >= classes:
        raise DatasetError(f"{path}: label {int(labels.max())} is out of range 0..{classes - 1}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- CIFAR-10: the "python version" archive or its extracted folder -----------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, numpy arrays): nothing runs."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar10(path: Path) -> Dataset:
    raw = read_cifar_files(path)
    train = [cifar_batch(raw[name], name) for name in CIFAR_TRAIN]
    test_images, test_labels = cifar_batch(raw["test_batch"], "test_batch")
    meta = unpickle(raw["batches.meta"], "batches.meta")
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise DatasetError("batches.meta has no label_names list")
    labels = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels_ for _, labels_ in train])
    check_label_range(train_labels, len(labels), "data_batch_*")
    check_label_range(test_labels, len(labels), "test_batch")
    return Dataset(
        name="cifar10",
        labels=labels,
        color="RGB",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        files={name: sha256_bytes(data) for name, data in raw.items()},
    )


def read_cifar_files(path: Path) -> dict[str, bytes]:
    """The six batch files, from the tar.gz archive or from an extracted folder."""
    archive = path if path.is_file() else path / CIFAR_ARCHIVE
    if archive.is_file():
        return read_cifar_archive(archive)
    for folder in (path / CIFAR_FOLDER, path):
        if (folder / "batches.meta").is_file():
            missing = [n for n in CIFAR_FILES if not (folder / n).is_file()]
            if missing:
                raise DatasetError(f"CIFAR-10 folder {folder} is missing {', '.join(missing)}")
            return {name: (folder / name).read_bytes() for name in CIFAR_FILES}
    raise DatasetError(
        f"CIFAR-10 not found in {path}: expected {CIFAR_ARCHIVE} (the 'CIFAR-10 python version' "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted {CIFAR_FOLDER}/ "
        f"with {', '.join(CIFAR_FILES)}"
    )


def read_cifar_archive(archive: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in CIFAR_FILES:
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        found[name] = extracted.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{archive} is not a readable tar.gz archive: {exc}") from exc
    missing = [n for n in CIFAR_FILES if n not in found]
    if missing:
        raise DatasetError(f"{archive} is missing {', '.join(missing)}")
    return found


def unpickle(data: bytes, name: str) -> object:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # unpickling fails in many ways; each means "not a CIFAR batch"
        raise DatasetError(f"{name} is not a CIFAR-10 python pickle: {exc}") from exc


def cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as uint8 [N, 32, 32, 3] and labels as int64 [N]."""
    batch = unpickle(data, name)
    if not isinstance(batch, dict):
        raise DatasetError(f"{name} does not hold a dict")
    pixels = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if pixels is None or labels is None:
        raise DatasetError(f"{name} has no 'data' and 'labels' entries")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{name}: data is {pixels.dtype} {pixels.shape}, expected uint8 [N, 3072]"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(pixels),):
        raise DatasetError(f"{name}: {len(pixels)} images but {labels.size} labels")
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{name}: negative label {int(labels.min())}")
    # stored as [N, 3 planes of 32x32]; the service and Pillow think in HWC
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


# --- A folder per class -------------------------------------------------------------------


def load_folder(
    root: Path,
    *,
    test_split: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    spec: InputSpec | None = None,
) -> Dataset:
    """A class-per-folder tree, split per class into train and test.

    Images are decoded by the service's preprocessing: with `spec` (a pretrained backbone's
    input) exactly as served; without, at a small size found from the images themselves.
    Unreadable files are skipped and counted (`Dataset.skipped`), never silently used.
    """
    if not 0 < test_split < 1:
        raise DatasetError(f"--test-split must be between 0 and 1, not {test_split}")
    files = list_folder(root)
    headers = {path: open_image(path) for paths in files.values() for path in paths}
    skipped = [path for path, header in headers.items() if header is None]
    readable_paths = [p for p, header in headers.items() if header is not None]
    note = ""
    if spec is None:
        readable = [header for header in headers.values() if header is not None]
        grey = bool(readable) and all(mode in GREY_MODES for mode, _ in readable)
        (height, width), note = folder_size([size for _, size in readable], image_size)
        spec = pixel_spec("L" if grey else "RGB", height, width)
    pixels = decode_files(readable_paths, spec)
    if spec.color == "RGB" and grey_content(pixels):
        spec = spec.model_copy(update={"color": "L", "channels": 1, "mean": [0.0], "std": [1.0]})
        pixels = decode_files(readable_paths, spec)
        note += "; colour: grey (every image's channels are equal), served as one channel"
    skipped += [path for path, image in pixels.items() if image is None]
    files = readable_files(root, files, skipped)
    labels = sorted(files)
    train_paths, test_paths = split_per_class(files, labels, test_split, seed)
    train_images, train_labels = stack(train_paths, pixels)
    test_images, test_labels = stack(test_paths, pixels)
    return Dataset(
        name=root.resolve().name,
        labels=labels,
        color=spec.color,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        files={
            str(path.relative_to(root)): sha256_bytes(path.read_bytes())
            for paths in files.values()
            for path in paths
        },
        test_encoded=[path.read_bytes() for path, _ in test_paths],
        train_sources=[path for path, _ in train_paths],
        skipped=sorted(str(path.relative_to(root)) for path in skipped),
        input_note=note,
    )


def grey_content(pixels: dict[Path, np.ndarray | None]) -> bool:
    """Whether every decoded RGB image is grey: its three channels (nearly) equal."""
    images = [image for image in pixels.values() if image is not None]
    if not images:
        return False
    for image in images:
        wide = image.astype(np.int16)
        if np.abs(wide[..., 0] - wide[..., 1]).max() > GREY_TOLERANCE:
            return False
        if np.abs(wide[..., 1] - wide[..., 2]).max() > GREY_TOLERANCE:
            return False
    return True


def list_folder(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DatasetError(
            f"image folder {root} not found: expected one sub-folder per class of "
            "JPEG/PNG/WebP files"
        )
    classes = {
        sub.name: sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for sub in sorted(root.iterdir())
        if sub.is_dir() and not sub.name.startswith(".")
    }
    classes = {name: paths for name, paths in classes.items() if paths}
    if len(classes) < 2:
        raise DatasetError(
            f"{root} needs at least two class sub-folders with JPEG/PNG/WebP images "
            f"(found {len(classes)})"
        )
    return classes


def readable_files(
    root: Path, files: dict[str, list[Path]], skipped: list[Path]
) -> dict[str, list[Path]]:
    """Each class's readable files; every class needs two (one to train on, one to test)."""
    unreadable = set(skipped)
    readable = {name: [p for p in paths if p not in unreadable] for name, paths in files.items()}
    too_few = [name for name, paths in readable.items() if len(paths) < 2]
    if too_few:
        counts = ", ".join(
            f"{name} ({len(readable[name])} readable of {len(files[name])})" for name in too_few
        )
        raise DatasetError(
            f"classes in {root} have fewer than 2 readable images (one is needed for training "
            f"and one for testing): {counts}"
        )
    return readable


def open_image(path: Path) -> tuple[str, tuple[int, int]] | None:
    """(mode, (width, height)) from the header, without decoding pixels; None if unreadable."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def folder_size(
    sizes: list[tuple[int, int]], image_size: int | None
) -> tuple[tuple[int, int], str]:
    """((height, width), why): `image_size` square, else the most common size, its shorter
    side shrunk to FOLDER_MAX_SHORT_SIDE when larger (never enlarged)."""
    if image_size:
        return (image_size, image_size), f"input {image_size}x{image_size}: --image-size"
    if not sizes:
        side = FOLDER_MAX_SHORT_SIDE
        return (side, side), f"input {side}x{side}: no readable image to measure"
    (width, height), count = Counter(sizes).most_common(1)[0]
    scale = min(1.0, FOLDER_MAX_SHORT_SIDE / min(width, height))
    size = max(1, round(height * scale)), max(1, round(width * scale))
    why = f"the most common image size, {width}x{height} ({count} of {len(sizes)} images)"
    if scale < 1:
        why += f", shorter side capped at {FOLDER_MAX_SHORT_SIDE}"
    else:
        why += ", at full resolution"
    return size, f"input {size[1]}x{size[0]}: {why}"


def split_per_class(
    files: dict[str, list[Path]], labels: list[str], test_split: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """A seeded split within each class, so both halves hold every class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for index, label in enumerate(labels):
        paths = files[label]
        order = rng.permutation(len(paths))
        n_test = min(len(paths) - 1, max(1, round(len(paths) * test_split)))
        test += [(paths[i], index) for i in order[:n_test]]
        train += [(paths[i], index) for i in order[n_test:]]
    return train, test


def pixel_spec(color: str, height: int, width: int) -> InputSpec:
    """An input spec for decoding only (its mean and std are never applied)."""
    channels = 1 if color == "L" else 3
    return InputSpec(
        height=height,
        width=width,
        channels=channels,
        color=color,
        mean=[0.0] * channels,
        std=[1.0] * channels,
    )


def decode_files(paths: list[Path], spec: InputSpec) -> dict[Path, np.ndarray | None]:
    """Each file's pixels through the service's own preprocessing; None where it fails."""
    from app.errors import BlinkError
    from app.preprocess import Preprocessor

    preprocess = Preprocessor(spec)
    decoded: dict[Path, np.ndarray | None] = {}
    for path in paths:
        try:
            decoded[path] = preprocess.pixels(path.read_bytes())
        except (BlinkError, OSError):
            decoded[path] = None
    return decoded


def stack(
    items: list[tuple[Path, int]], pixels: dict[Path, np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    decoded = cast("dict[Path, np.ndarray]", pixels)  # `items` holds only files that decoded
    images = np.stack([decoded[path] for path, _ in items])
    return images, np.array([label for _, label in items], np.int64)


# --- Subsets and splits --------------------------------------------------------------------


def limit(dataset: Dataset, n_train: int, seed: int) -> Dataset:
    """A seeded random `n_train` training images and `n_train // 5` test images."""
    rng = np.random.default_rng(seed)
    train = np.sort(rng.permutation(len(dataset.train_labels))[:n_train])
    test = np.sort(rng.permutation(len(dataset.test_labels))[: max(1, n_train // 5)])
    encoded, sources = dataset.test_encoded, dataset.train_sources
    return Dataset(
        name=dataset.name,
        labels=dataset.labels,
        color=dataset.color,
        train_images=dataset.train_images[train],
        train_labels=dataset.train_labels[train],
        test_images=dataset.test_images[test],
        test_labels=dataset.test_labels[test],
        files=dataset.files,
        test_encoded=None if encoded is None else [encoded[i] for i in test],
        train_sources=None if sources is None else [sources[i] for i in train],
        skipped=dataset.skipped,
    )


def split_validation(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (validation images, labels)), a seeded random split."""
    train, val = validation_indices(len(labels), fraction, seed)
    return (images[train], labels[train]), (images[val], labels[val])


def validation_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of `count` items, a seeded random split."""
    train, val, _ = held_out_indices(count, fraction, 0.0, seed)
    return train, val


def held_out_indices(
    count: int, val_fraction: float, calibration_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training, validation, calibration) indices of `count` items, one seeded permutation:
    validation picks epochs and candidates and fits the temperature, calibration only sets
    the conformal thresholds; neither is trained on. `calibration_fraction` 0: none."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-split must be between 0 and 1, not {val_fraction}")
    if not 0 <= calibration_fraction < 1 or val_fraction + calibration_fraction >= 1:
        raise DatasetError(
            f"--calibration-split must be in [0, 1) and leave training images beside "
            f"--val-split {val_fraction}, not {calibration_fraction}"
        )
    order = np.random.default_rng(seed + 1).permutation(count)
    n_val = max(1, round(count * val_fraction))
    n_cal = round(count * calibration_fraction)
    if count - n_val - n_cal < 1:
        raise DatasetError(f"{count} training images leave none to train on after the splits")
    return (
        np.sort(order[n_val + n_cal :]),
        np.sort(order[:n_val]),
        np.sort(order[n_val : n_val + n_cal]),
    )


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale, as the manifest records."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(0).round(4).tolist(), np.maximum(pixels.std(0), 1e-3).round(4).tolist()


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 [H, W, C] image as PNG bytes (what a client would post)."""
    mode = "L" if image.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(buffer, "PNG")
    return buffer.getvalue()
