"""The model bundle: `manifest.json` plus ONNX files (the contract in DESIGN.md).

The offline build writes bundles with `Manifest`; the service loads them with `load_bundle`,
which refuses, with a message that names the problem, anything it cannot serve exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 2
# Schema 1 bundles (before crop_fraction, interpolation, NHWC and probability outputs) read as
# schema 2 with those fields at their defaults.
READABLE_SCHEMAS = (1, 2)
MANIFEST_FILE = "manifest.json"
LATEST_POINTER = "latest"
Precision = Literal["fp32", "int8", "fp16"]


class BundleError(Exception):
    """A bundle that cannot be served; the message says why."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1, 3]
    color: Literal["L", "RGB"]
    # center_crop: the largest centred region of the model's aspect ratio, shrunk to
    # crop_fraction of it, resized to height x width. ImageNet's "shorter side to 256, centre
    # crop 224" is crop_fraction 0.875 (224/256). stretch: the whole image, aspect ignored.
    resize: Literal["stretch", "center_crop"] = "center_crop"
    crop_fraction: float = Field(1.0, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # Normalised as (pixel / 255 - mean) / std per channel.
    mean: list[float]
    std: list[float]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32"] = "float32"

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if (self.color == "L") != (self.channels == 1):
            raise ValueError(f"color {self.color!r} does not match channels={self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One image's tensor shape, batch axis excluded: (C, H, W) or (H, W, C)."""
        if self.layout == "NHWC":
            return (self.height, self.width, self.channels)
        return (self.channels, self.height, self.width)


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "logits"
    # probabilities: the model ends in a softmax already, so the service must not apply another.
    kind: Literal["logits", "probabilities"] = "logits"


class Reference(BaseModel):
    """How the model answers on held-out images like its training data: what the service
    compares its recent answers with to tell that the images it sees have changed.

    Measured on the served variant's served scores (calibrated, where the bundle is): the
    share of answers per predicted class, the histogram of top-1 scores, and the share of
    answers whose top-1 score is below `low_confidence_threshold`.
    """

    model_config = ConfigDict(extra="forbid")

    split: str = Field(description="The images it was measured on")
    images: int = Field(gt=0)
    class_frequencies: list[float] = Field(description="Share of answers per class index")
    score_edges: list[float] = Field(min_length=2, description="Top-1 score bins, ascending")
    score_frequencies: list[float] = Field(description="Share of answers per score bin")
    low_confidence_threshold: float = Field(ge=0, le=1)
    low_confidence_rate: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _shares(self) -> Reference:
        if len(self.score_frequencies) != len(self.score_edges) - 1:
            raise ValueError("score_frequencies needs one entry per bin between score_edges")
        if any(b <= a for a, b in zip(self.score_edges, self.score_edges[1:], strict=False)):
            raise ValueError("score_edges must ascend")
        for name in ("class_frequencies", "score_frequencies"):
            shares = getattr(self, name)
            if any(f < 0 for f in shares) or abs(sum(shares) - 1) > 1e-6:
                raise ValueError(f"{name} must be non-negative shares that sum to 1")
        return self


class Calibration(BaseModel):
    """What makes scores meaningful: a temperature fitted on a split the model never trained
    on, and split-conformal thresholds for prediction sets (docs/calibration.md).

    The served score of class i is softmax(logits / temperature)[i]. For a coverage level c
    (a key of `thresholds`, e.g. "0.95") the prediction set is every label whose served score
    is at least `thresholds[c]`, or the top label alone when none reaches it (a set is never
    empty), so the true label is in it for at least a fraction c of exchangeable images.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0)
    thresholds: dict[str, float] = Field(default_factory=dict)
    # how they were fitted: which split, how many images
    split: str = ""
    images: int = Field(0, ge=0)
    # figures measured on the test split, for the report and /v1/models
    ece_before: float | None = None
    ece_after: float | None = None
    coverage: dict[str, float] = Field(default_factory=dict)
    mean_set_size: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _levels(self) -> Calibration:
        for level, threshold in self.thresholds.items():
            try:
                value = float(level)
            except ValueError:
                raise ValueError(f"coverage level {level!r} is not a number") from None
            if not 0 < value < 1:
                raise ValueError(f"coverage level {level} is outside (0, 1)")
            if not 0 <= threshold <= 1:
                raise ValueError(f"threshold {threshold} for coverage {level} is outside [0, 1]")
        return self

    def threshold_for(self, coverage: float) -> float | None:
        """The score threshold recorded for `coverage`, or None when that level is not."""
        for level, threshold in self.thresholds.items():
            if abs(float(level) - coverage) < 1e-9:
                return threshold
        return None


class VariantFile(BaseModel):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """`manifest.json`; unknown top-level keys are kept for forward compatibility."""

    model_config = ConfigDict(extra="allow")

    schema_: int = Field(SCHEMA_VERSION, alias="schema")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    created: str
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec = OutputSpec()
    variants: dict[Precision, VariantFile] = Field(min_length=1)
    metrics: dict[str, dict[str, float | int | str | list[Any] | dict[Any, Any]]] = Field(
        default_factory=dict
    )
    provenance: dict[str, object] = Field(default_factory=dict)
    # absent in bundles built without labelled held-out data: scores are then the plain softmax
    calibration: Calibration | None = None
    # absent likewise: no drift is measured against it
    reference: Reference | None = None

    @model_validator(mode="after")
    def _supported(self) -> Manifest:
        if self.schema_ not in READABLE_SCHEMAS:
            raise ValueError(
                f"schema {self.schema_} is not supported (readable: {list(READABLE_SCHEMAS)})"
            )
        if "fp32" not in self.variants:
            raise ValueError("variants must include fp32")
        if self.reference is not None and len(self.reference.class_frequencies) != len(self.labels):
            raise ValueError(
                f"reference.class_frequencies has {len(self.reference.class_frequencies)} "
                f"entries for {len(self.labels)} labels"
            )
        return self

    def dump(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2) + "\n"


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: Manifest

    def variant_path(self, precision: Precision) -> Path:
        return self.directory / self.manifest.variants[precision].file


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_bundle_dir(path: Path) -> Path:
    """A bundle directory as given, or `<repository>/<name>` resolved through its `latest`."""
    if (path / MANIFEST_FILE).exists():
        return path
    latest = path / LATEST_POINTER
    if latest.is_dir():
        return latest.resolve()
    if latest.is_file():  # a pointer file naming the version, where symlinks are unavailable
        version = latest.read_text().strip()
        if not version or not (path / version).is_dir():
            raise BundleError(f"{latest} names version {version!r}, which is not in {path}")
        return path / version
    if latest.is_symlink():  # dangling: the version it named is gone
        raise BundleError(f"{latest} points to {latest.readlink()}, which does not exist")
    if not path.exists():
        raise BundleError(f"model bundle not found: {path} does not exist")
    raise BundleError(f"no {MANIFEST_FILE} in {path} (and no '{LATEST_POINTER}' pointer)")


def point_latest(home: Path, version: str) -> None:
    """Point `home/latest` at `version` atomically: readers see the old or the new, never none."""
    link = home / LATEST_POINTER
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(version)
    os.replace(temporary, link)


def promote(home: Path, version: str) -> str:
    """Make `version` the one `<repository>/<name>` serves: check that it is a bundle the
    service can load (its manifest, every variant's hash), then move `latest` to it. Returns
    the version it named before ("" if none); promoting that one back is the rollback."""
    if (home / MANIFEST_FILE).exists():
        raise BundleError(f"{home} is a bundle without versions: there is nothing to promote")
    if version in ("", LATEST_POINTER) or "/" in version or not (home / version).is_dir():
        versions = (
            sorted(
                d.name
                for d in home.iterdir()
                if d.is_dir() and not d.name.startswith(".") and d.name != LATEST_POINTER
            )
            if home.is_dir()
            else []
        )
        raise BundleError(
            f"version {version!r} is not in {home} (versions: {', '.join(versions) or 'none'})"
        )
    bundle = load_bundle(home / version)  # a version that cannot serve is never promoted
    for precision in bundle.manifest.variants:
        verify_variant(bundle, precision)
    try:
        previous = resolve_bundle_dir(home).name
    except BundleError:
        previous = ""
    point_latest(home, version)
    return previous


def read_manifest(directory: Path) -> Manifest:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"manifest missing: {manifest_path}")
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest is not valid JSON: {manifest_path}: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"manifest is invalid: {manifest_path}: {problems}") from exc


def verify_variant(bundle: Bundle, precision: Precision) -> Path:
    """The variant's file, after checking it exists and matches its recorded sha256."""
    entry = bundle.manifest.variants[precision]
    path = bundle.variant_path(precision)
    if not path.is_file():
        raise BundleError(f"variant {precision} file missing: {path}")
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise BundleError(
            f"sha256 mismatch for variant {precision} ({path}): "
            f"manifest says {entry.sha256}, file is {actual}"
        )
    return path


def load_bundle(path: Path) -> Bundle:
    directory = resolve_bundle_dir(Path(path))
    return Bundle(directory=directory, manifest=read_manifest(directory))
