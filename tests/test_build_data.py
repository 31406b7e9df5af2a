"""Dataset loaders (models/data/datasets.py) on small fixture files written here in each real
format."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.commands.build import main as build_main
from models.data import datasets as data

# --- writers for each real format --------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000080N, N big-endian sizes, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(
    directory: Path, n_train: int = 30, n_test: int = 10, *, compress: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in data.IDX_FILES.items():
        raw = idx_bytes(arrays[key])
        if compress:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


def cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {
        b"batch_label": b"batch",
        b"labels": labels,
        b"data": pixels,
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }
    return batch, pixels, labels


def write_cifar_folder(folder: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """data_batch_1..5, test_batch and batches.meta as the python-version pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate([*data.CIFAR_TRAIN, "test_batch"]):
        batch, pixels, labels = cifar_batch(n, seed=i)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (pixels, labels)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_cifar_archive(directory: Path) -> tuple[Path, dict]:
    staging = directory / "staging"
    written = write_cifar_folder(staging / data.CIFAR_FOLDER)
    archive = directory / data.CIFAR_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / data.CIFAR_FOLDER, arcname=data.CIFAR_FOLDER)
    return archive, written


def write_image_folder(root: Path, per_class: int = 5) -> None:
    """Three classes: grey PNGs, RGB JPEGs and RGBA PNGs of assorted sizes."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (root / name).mkdir(parents=True)
    for i in range(per_class):
        grey = rng.integers(0, 256, (20, 24), dtype=np.uint8)
        Image.fromarray(grey, "L").save(root / "cat" / f"{i}.png")
        colour = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(colour, "RGB").save(root / "dog" / f"{i}.JPG", quality=90)
        rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(root / "fox" / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")


# --- Fashion-MNIST (idx) -----------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_loads_images_labels_and_hashes(tmp_path: Path, compress: bool) -> None:
    arrays = write_idx_dataset(tmp_path, compress=compress)
    dataset = data.load("fashion-mnist", tmp_path)
    assert dataset.train_images.shape == (30, 28, 28, 1)
    assert dataset.test_images.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(dataset.train_images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["test_labels"])
    assert dataset.train_labels.dtype == np.int64
    assert dataset.color == "L" and dataset.labels[0] == "T-shirt/top" and len(dataset.labels) == 10
    assert len(dataset.files) == 4
    suffix = ".gz" if compress else ""
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    assert dataset.files[path.name] == data.sha256_bytes(path.read_bytes())


def test_dataset_hash_changes_with_any_file(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "a", seed=0)
    write_idx_dataset(tmp_path / "b", seed=0)
    write_idx_dataset(tmp_path / "c", seed=1)
    a, b, c = (data.load_fashion_mnist(tmp_path / d).sha256 for d in "abc")
    assert a == b != c


def test_idx_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "nowhere")
    write_idx_dataset(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetError, match=r"missing t10k-labels-idx1-ubyte\.gz"):
        data.load_fashion_mnist(tmp_path / "partial")


def overwrite(directory: Path, stem: str, raw: bytes) -> None:
    (directory / f"{stem}.gz").write_bytes(raw)


MALFORMED_IDX = {
    "bad magic": (
        "train-images-idx3-ubyte",
        gzip.compress(b"\x00\x00\x0d\x03" + b"\0" * 64),
        "not an idx file of unsigned bytes",
    ),
    "wrong dims": (
        "train-labels-idx1-ubyte",
        gzip.compress(idx_bytes(np.zeros((30, 2), np.uint8))),
        "with 1 dimension",
    ),
    "truncated": (
        "train-images-idx3-ubyte",
        gzip.compress(idx_bytes(np.zeros((30, 28, 28), np.uint8))[:-5]),
        "holds",
    ),
    "not gzip": ("train-images-idx3-ubyte", b"\x1f\x8bgarbage", "not a valid gzip"),
    "too short": ("test-labels", b"", "too short"),
    "count mismatch": (
        "train-labels-idx1-ubyte",
        gzip.compress(idx_bytes(np.zeros(29, np.uint8))),
        "30 images but train-labels-idx1-ubyte.gz has 29 labels",
    ),
    "label out of range": (
        "t10k-labels-idx1-ubyte",
        gzip.compress(idx_bytes(np.full(10, 12, np.uint8))),
        "label 12 is out of range",
    ),
}


@pytest.mark.parametrize("case", MALFORMED_IDX)
def test_idx_malformed_is_a_clear_error(tmp_path: Path, case: str) -> None:
    write_idx_dataset(tmp_path)
    stem, raw, message = MALFORMED_IDX[case]
    if stem == "test-labels":
        stem = "t10k-labels-idx1-ubyte"
    overwrite(tmp_path, stem, raw)
    with pytest.raises(data.DatasetError, match=message):
        data.load_fashion_mnist(tmp_path)


# --- CIFAR-10 (python version) -----------------------------------------------------------


def test_cifar_archive_and_folder_load_the_same(tmp_path: Path) -> None:
    archive, written = write_cifar_archive(tmp_path)
    from_archive = data.load("cifar10", archive)
    from_parent = data.load("cifar10", tmp_path)  # the folder holding the archive
    from_folder = data.load("cifar10", tmp_path / "staging")  # holding cifar-10-batches-py/
    from_batches = data.load("cifar10", tmp_path / "staging" / data.CIFAR_FOLDER)
    for other in (from_parent, from_folder, from_batches):
        np.testing.assert_array_equal(other.train_images, from_archive.train_images)
        np.testing.assert_array_equal(other.test_labels, from_archive.test_labels)
        assert other.sha256 == from_archive.sha256
    dataset = from_archive
    assert dataset.train_images.shape == (20, 32, 32, 3)
    assert dataset.test_images.shape == (4, 32, 32, 3)
    assert dataset.color == "RGB" and dataset.labels == [f"class{i}" for i in range(10)]
    # rows of 3072 bytes are three 32x32 planes (R, G, B); images are HWC
    pixels, labels = written["data_batch_2"]
    image = dataset.train_images[4]  # the first image of the second batch
    assert image[0, 1, 0] == pixels[0, 1]
    assert image[0, 1, 1] == pixels[0, 1024 + 1]
    assert image[31, 31, 2] == pixels[0, 3071]
    assert dataset.train_labels[4:8].tolist() == labels
    assert set(dataset.files) == set(data.CIFAR_FILES)


def test_cifar_missing_names_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match=r"cifar-10-python\.tar\.gz"):
        data.load("cifar10", tmp_path)
    with pytest.raises(data.DatasetError, match="needs --data-dir"):
        data.load("cifar10", None)
    write_cifar_folder(tmp_path / data.CIFAR_FOLDER)
    (tmp_path / data.CIFAR_FOLDER / "data_batch_3").unlink()
    with pytest.raises(data.DatasetError, match="missing data_batch_3"):
        data.load("cifar10", tmp_path)


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar_refuses_pickles_that_would_run_code(tmp_path: Path) -> None:
    folder = tmp_path / data.CIFAR_FOLDER
    write_cifar_folder(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(data.DatasetError, match=r"test_batch is not a CIFAR-10 .*refusing"):
        data.load("cifar10", tmp_path)


def test_cifar_malformed_batches(tmp_path: Path) -> None:
    folder = tmp_path / data.CIFAR_FOLDER
    write_cifar_folder(folder)
    wrong = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(wrong, protocol=2))
    with pytest.raises(data.DatasetError, match=r"data_batch_1: data is uint8 \(4, 100\)"):
        data.load("cifar10", tmp_path)
    (folder / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(data.DatasetError, match="data_batch_1 is not a CIFAR-10 python pickle"):
        data.load("cifar10", tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / data.CIFAR_ARCHIVE).write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(data.DatasetError, match=r"not a readable tar\.gz"):
        data.load("cifar10", tmp_path / "broken")


# --- a folder per class ------------------------------------------------------------------


def test_folder_split_is_per_class_seeded_and_keeps_originals(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets")
    dataset = data.load("folder", tmp_path / "pets", test_split=0.4, seed=3)
    assert dataset.name == "pets" and dataset.labels == ["cat", "dog", "fox"]
    assert dataset.color == "RGB"  # any colour image makes the dataset RGB
    assert dataset.size == (20, 24)  # the most common size
    assert dataset.train_images.shape == (9, 20, 24, 3)
    assert np.bincount(dataset.test_labels).tolist() == [2, 2, 2]
    assert len(dataset.files) == 15  # the .txt file is not an image
    # test images stay the encoded originals, so evaluation decodes what a client would send
    assert dataset.test_encoded is not None and len(dataset.test_encoded) == 6
    assert dataset.test_encoded[0].startswith(b"\x89PNG")
    again = data.load("folder", tmp_path / "pets", test_split=0.4, seed=3)
    np.testing.assert_array_equal(again.test_images, dataset.test_images)
    other_seed = data.load("folder", tmp_path / "pets", test_split=0.4, seed=4)
    assert other_seed.test_encoded != dataset.test_encoded


def test_folder_decodes_through_the_service_preprocessing(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets")
    dataset = data.load("folder", tmp_path / "pets", image_size=16)
    assert dataset.train_images.shape[1:] == (16, 16, 3)
    from app.bundle import InputSpec
    from app.preprocess import Preprocessor

    spec = InputSpec(height=16, width=16, channels=3, color="RGB", mean=[0] * 3, std=[1] * 3)
    expected = Preprocessor(spec)(dataset.test_encoded[0])[0].transpose(1, 2, 0)
    np.testing.assert_allclose(dataset.test_images[0], expected * 255, atol=0.5)


def test_folder_of_grey_images_is_grey(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / name / f"{i}.png")
    dataset = data.load("folder", tmp_path)
    assert dataset.color == "L" and dataset.train_images.shape[1:] == (8, 8, 1)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="one sub-folder per class"):
        data.load("folder", tmp_path / "missing")
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(data.DatasetError, match="at least two class sub-folders"):
        data.load("folder", tmp_path / "one")
    (tmp_path / "one" / "lonely").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "one" / "lonely" / "a.png")
    with pytest.raises(data.DatasetError, match="fewer than 2 readable images"):
        data.load("folder", tmp_path / "one")
    write_image_folder(tmp_path / "broken")
    (tmp_path / "broken" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert data.load("folder", tmp_path / "broken").skipped == ["cat/0.png"]  # skipped, counted
    with pytest.raises(data.DatasetError, match="--test-split"):
        data.load("folder", tmp_path / "one", test_split=1.5)


def test_folder_size_is_the_images_own_with_the_shorter_side_capped() -> None:
    """Detail must survive preprocessing: no downsampling below the cap, never enlarged."""
    cap = data.FOLDER_MAX_SHORT_SIDE
    assert cap == 320
    # sizes are (width, height), as Pillow reports them; the answer is (height, width)
    small, why = data.folder_size([(50, 40), (50, 40), (30, 30)], None)
    assert small == (40, 50)
    assert why == (
        "input 50x40: the most common image size, 50x40 (2 of 3 images), at full resolution"
    )
    large, why = data.folder_size([(640, 480)] * 3 + [(100, 100)], None)
    assert large == (cap, round(640 * cap / 480))  # the aspect ratio kept
    assert "shorter side capped at 320" in why and "640x480 (3 of 4 images)" in why
    tall, _ = data.folder_size([(400, 1200)], None)
    assert tall == (1200 * cap // 400, cap)
    exact, why = data.folder_size([(320, 500)], None)
    assert exact == (500, 320) and "at full resolution" in why
    forced, why = data.folder_size([(640, 480)], 96)
    assert forced == (96, 96) and why == "input 96x96: --image-size"


def test_folder_keeps_full_resolution_and_says_why(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "big" / name).mkdir(parents=True)
        (tmp_path / "small" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "big" / name / f"{i}.png")
            Image.fromarray(pixels[:60, :70]).save(tmp_path / "small" / name / f"{i}.png")
    big = data.load("folder", tmp_path / "big")
    assert big.size == (320, 427) and big.train_images.shape[1:] == (320, 427, 3)
    assert "shorter side capped at 320" in big.input_note
    small = data.load("folder", tmp_path / "small")
    assert small.size == (60, 70)
    assert "at full resolution" in small.input_note
    # at full resolution the training pixels are the file's own
    assert small.train_sources is not None
    source = np.asarray(Image.open(small.train_sources[0]))
    np.testing.assert_array_equal(small.train_images[0], source)


def test_grey_content_saved_as_rgb_is_one_channel(tmp_path: Path) -> None:
    """Grey photos saved as RGB (JPEG encoders, screenshot tools) are decoded as grey."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            grey = Image.fromarray(rng.integers(0, 256, (24, 32), dtype=np.uint8), "L")
            rgb = grey.convert("RGB")
            assert rgb.mode == "RGB"
            if i % 2:
                rgb.save(tmp_path / name / f"{i}.jpg", quality=90)
            else:
                rgb.save(tmp_path / name / f"{i}.png")
    dataset = data.load("folder", tmp_path)
    assert dataset.color == "L" and dataset.train_images.shape[1:] == (24, 32, 1)
    assert "colour: grey" in dataset.input_note
    # one coloured image anywhere keeps the whole folder RGB
    tinted = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(tinted).save(tmp_path / "b" / "colour.png")
    assert data.load("folder", tmp_path).color == "RGB"


def test_grey_content_tolerates_encoder_noise_only() -> None:
    grey = np.random.default_rng(0).integers(0, 250, (8, 8, 1), dtype=np.uint8)
    exact = np.repeat(grey, 3, axis=2)
    nudged = exact.copy()
    nudged[..., 2] += data.GREY_TOLERANCE
    tinted = exact.copy()
    tinted[0, 0, 1] += data.GREY_TOLERANCE + 1
    paths = [Path(f"{i}.png") for i in range(3)]
    assert data.grey_content(dict(zip(paths, [exact, nudged, None], strict=True)))
    assert not data.grey_content(dict(zip(paths, [exact, nudged, tinted], strict=True)))
    assert not data.grey_content({})
    assert not data.grey_content({paths[0]: None})


def test_held_out_indices_are_disjoint_complete_and_seeded() -> None:
    train, val, calibration = data.held_out_indices(200, 0.1, 0.15, seed=4)
    assert (len(train), len(val), len(calibration)) == (150, 20, 30)
    joined = np.concatenate([train, val, calibration])
    assert sorted(joined.tolist()) == list(range(200))  # disjoint, nothing lost
    for part in (train, val, calibration):
        assert np.all(np.diff(part) > 0)  # sorted
    again = data.held_out_indices(200, 0.1, 0.15, seed=4)
    for mine, theirs in zip((train, val, calibration), again, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    other = data.held_out_indices(200, 0.1, 0.15, seed=5)
    assert not np.array_equal(other[1], val)
    # no calibration split: the validation split is the one validation_indices gives
    train0, val0, calibration0 = data.held_out_indices(200, 0.1, 0.0, seed=4)
    assert len(calibration0) == 0 and len(val0) == 20
    for mine, theirs in zip((train0, val0), data.validation_indices(200, 0.1, 4), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    with pytest.raises(data.DatasetError, match="--val-split"):
        data.held_out_indices(200, 0.0, 0.1, seed=0)
    with pytest.raises(data.DatasetError, match="--calibration-split"):
        data.held_out_indices(200, 0.5, 0.5, seed=0)
    with pytest.raises(data.DatasetError, match="leave none to train on"):
        data.held_out_indices(2, 0.5, 0.4, seed=0)


# --- subsets, splits, statistics ---------------------------------------------------------


def test_limit_split_and_stats(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=50, n_test=20)
    dataset = data.load_fashion_mnist(tmp_path)
    small = data.limit(dataset, 25, seed=0)
    assert len(small.train_labels) == 25 and len(small.test_labels) == 5
    (train, train_labels), (val, val_labels) = data.split_validation(
        small.train_images, small.train_labels, 0.2, seed=0
    )
    assert len(train) == 20 and len(val) == 5 and len(train_labels) + len(val_labels) == 25
    joined = np.concatenate([train, val]).reshape(25, -1)
    assert len({row.tobytes() for row in joined}) == 25  # disjoint, nothing lost
    mean, std = data.channel_stats(np.full((2, 4, 4, 1), 51, np.uint8))
    assert mean == [0.2] and std == [0.001]  # a constant image: std floored, never zero


def test_png_encoding_round_trips() -> None:
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(data.encode_png(image))))
    np.testing.assert_array_equal(decoded, image[..., 0])


# --- the CLI's one-line errors -----------------------------------------------------------


def test_cli_missing_dataset_exits_2_with_install_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = build_main(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "repo")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("blink build: error: Fashion-MNIST not found")
    assert "apt-get install dataset-fashion-mnist" in error
    assert not (tmp_path / "repo").exists()


def test_cli_malformed_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_idx_dataset(tmp_path)
    overwrite(tmp_path, "train-images-idx3-ubyte", b"\x1f\x8bgarbage")
    code = build_main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "repo")])
    assert code == 2
    assert "is not a valid gzip file" in capsys.readouterr().err


def test_cli_rejects_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main(["--prune", "1.5"]) == 2
    assert "--prune must be a fraction" in capsys.readouterr().err
    assert build_main(["--teacher", str(tmp_path / "none.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
