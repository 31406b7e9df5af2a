"""What `BLINK_SHADOW` and `BLINK_CANARY` name: which model gets which candidate, for what share.

One entry per model, comma-separated: `[MODEL=]CANDIDATE[@FRACTION]`. CANDIDATE is a version
directory of the model (`<repository>/<model>/<CANDIDATE>`) or the path of any bundle; without
MODEL the entry is for the default model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.bundle import MANIFEST_FILE, BundleError


@dataclass(frozen=True)
class CandidateSpec:
    model: str | None  # None: the default model
    candidate: str
    fraction: float


def parse_fraction(text: str) -> float:
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:  # also refuses nan
        raise ValueError(f"a fraction is a number above 0 and at most 1, not {text!r}")
    return fraction


def parse_candidates(text: str, *, fraction_required: bool) -> list[CandidateSpec]:
    """The entries of a setting; ValueError naming the entry that is wrong."""
    specs: list[CandidateSpec] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        model, equals, rest = entry.partition("=")
        if not equals:
            model, rest = "", entry
        candidate, at, fraction_text = rest.rpartition("@")
        if not at:
            if fraction_required:
                raise ValueError(f"{entry!r}: name the fraction it answers, e.g. {entry}@0.05")
            candidate, fraction_text = rest, "1"
        if not candidate:
            raise ValueError(f"{entry!r}: name a version directory or a bundle path")
        key = model or None
        if any(spec.model == key for spec in specs):
            raise ValueError(f"{entry!r}: one candidate per model")
        specs.append(CandidateSpec(key, candidate, parse_fraction(fraction_text)))
    return specs


def candidate_directory(source: Path, candidate: str) -> Path:
    """Where a candidate's bundle is: a version beside the model's others, or a path.

    `source` is what the model is served from: `<repository>/<name>` (holding `latest`) or a
    bundle directory itself (its siblings are the other versions)."""
    for directory in (source / candidate, source.parent / candidate, Path(candidate)):
        if "/" not in candidate and directory == Path(candidate):
            continue  # a bare version name is looked up beside the model only
        if (directory / MANIFEST_FILE).is_file():
            return directory
    raise BundleError(
        f"no bundle {candidate!r}: name a version directory of {source} or a bundle path "
        f"(a directory holding {MANIFEST_FILE})"
    )
