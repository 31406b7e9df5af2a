"""What the build's stages share: its errors, its record of stages, and small file helpers."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.bundle import Manifest, Precision, VariantFile, point_latest, sha256_of

# The files a bundle's variants live in (the contract in DESIGN.md).
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


class BuildError(Exception):
    """A build that cannot go on; the message is the one line the user sees."""


class GateFailed(Exception):
    """The accuracy gate failed; the bundle was written but `latest` was not moved."""


@dataclass
class Stage:
    name: str
    seconds: float


@dataclass
class BuildState:
    """What the stages produce, for the manifest and the report."""

    args: argparse.Namespace
    argv: list[str]
    name: str = ""
    version: str = ""
    training_precision: str = "fp32"  # what --precision resolved to: fp32, bf16 or fp16
    started: float = field(default_factory=time.perf_counter)
    stages: list[Stage] = field(default_factory=list)
    histories: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    compression: dict[str, dict] = field(default_factory=dict)
    network: dict[str, object] = field(default_factory=dict)  # what was trained, for provenance
    training: dict[str, object] = field(default_factory=dict)  # settings beyond the common ones
    # held-out (images, labels) at the model's input: validation (the temperature is fitted
    # on it) and calibration (the conformal thresholds); None where the build has neither
    held_out: tuple | None = None
    coverage: tuple[float, ...] = ()  # the prediction sets' levels asked for
    candidates: list[dict] = field(default_factory=list)  # a folder build's table, as tried
    input_note: str = ""  # how the input size and colour were chosen

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        log(f"{name}...")
        yield
        seconds = time.perf_counter() - started
        self.stages.append(Stage(name, seconds))
        log(f"{name}: {seconds:.1f}s")


def log(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


def default_version() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


@contextlib.contextmanager
def quiet_stdout():
    """The ONNX exporter prints progress lines and warns about torchvision; keep them out."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        exporter_log.setLevel(level)


def verify(directory: Path) -> None:
    """The service's loader and engine accept the bundle and answer a batch."""
    from app.bundle import load_bundle
    from app.engine import Engine

    bundle = load_bundle(directory)
    spec = bundle.manifest.input
    for variant in bundle.manifest.variants:
        engine = Engine(bundle, device="cpu", variant=variant, threads=1)
        logits = engine.run(np.zeros((2, *spec.sample_shape), np.float32))
        if logits.shape != (2, len(bundle.manifest.labels)) or not np.isfinite(logits).all():
            raise BuildError(f"the {variant} variant answered {logits.shape} non-finite logits")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def variant_entries(directory: Path, variants: Iterable[Precision]) -> dict[Precision, VariantFile]:
    """The manifest's `variants`: each written file with its sha256 and size."""
    return {
        v: VariantFile(
            file=VARIANT_FILES[v],
            sha256=sha256_of(directory / VARIANT_FILES[v]),
            size=(directory / VARIANT_FILES[v]).stat().st_size,
        )
        for v in variants
    }


def progress(steps: int, desc: str, *, unit: str = "batch", quiet: bool = False) -> Any:
    """A tqdm bar over range(steps): shown on a terminal, off in a log file (disable=None) or
    when quiet; the stage and epoch lines print either way."""
    from tqdm import tqdm

    return tqdm(
        range(steps),
        desc=desc,
        unit=unit,
        leave=False,
        disable=True if quiet else None,
        mininterval=1.0,
        dynamic_ncols=True,
    )


def publish(home: Path, version: str, write: Callable[[Path], tuple[Manifest, list[str]]]) -> Path:
    """Write a bundle into a staging directory with `write`, move it to `home/version`, and
    move `latest` only when the gate passed (`write` returns the gate's failures)."""
    final = home / version
    staging = home / f".{version}.partial"
    remove_tree(staging)
    staging.mkdir(parents=True)
    try:
        manifest, failures = write(staging)
        os.replace(staging, final)
    except BaseException:
        remove_tree(staging)
        raise
    if failures:
        raise GateFailed(
            "; ".join(failures) + f" (bundle kept at {final} for inspection; latest not moved)"
        )
    verify(final)
    point_latest(home, version)
    log(f"bundle {final} ({manifest.variants['fp32'].size} bytes fp32), latest -> {version}")
    return final
