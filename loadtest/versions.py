"""Model repositories for reload checks: versions copied from a bundle, broken on purpose or not,
and the `latest` pointer moved as `blink build` moves it (one atomic rename).

Shared by the fault campaign (loadtest/faults.py) and the reload tests.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from app.bundle import MANIFEST_FILE, read_manifest

# What can be wrong with a new version; each must be refused, never served.
FAULTS = {
    "bad_hash": "a model file no longer matches its sha256 (load fails)",
    "bad_onnx": "a model file that is not ONNX, with a matching sha256 (load fails)",
    "bad_labels": "fewer labels than the model has outputs (warm-up fails)",
}


def add_version(repository: Path, source: Path, version: str, *, fault: str | None = None) -> Path:
    """Copy the bundle `source` to `repository/<version>`, its manifest naming `version`."""
    target = repository / version
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
    manifest = read_manifest(target)
    update: dict = {"version": version}
    if fault == "bad_hash":
        for entry in manifest.variants.values():
            with (target / entry.file).open("ab") as f:
                f.write(b"\0")
    elif fault == "bad_onnx":
        variants = {}
        for precision, entry in manifest.variants.items():
            data = b"this is not an ONNX model"
            (target / entry.file).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            variants[precision] = entry.model_copy(update={"sha256": digest, "size": len(data)})
        update["variants"] = variants
    elif fault == "bad_labels":
        update["labels"] = manifest.labels[:-1]
    elif fault is not None:
        raise ValueError(f"unknown fault {fault!r} (known: {sorted(FAULTS)})")
    (target / MANIFEST_FILE).write_text(manifest.model_copy(update=update).dump())
    return target
