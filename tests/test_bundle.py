"""The bundle contract (app/bundle.py) and `blink serve` refusing bundles it cannot serve."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.bundle import (
    BundleError,
    Manifest,
    load_bundle,
    read_manifest,
    resolve_bundle_dir,
    verify_variant,
)
from loadtest.processes import free_port
from tests.conftest import ROOT, live_server
from tests.onnx_models import LABELS, write_bundle

Edit = Callable[[Path], None]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid fp32-only bundle that every case copies before breaking it."""
    return write_bundle(tmp_path_factory.mktemp("pristine") / "tiny" / "1")


def copy_of(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "tiny" / "1"))


def edit_manifest(change: Callable[[dict], None]) -> Edit:
    def apply(bundle: Path) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))

    return apply


def set_input(**fields: object) -> Edit:
    return edit_manifest(lambda m: m["input"].update(fields))


def write_model(data: bytes, *, rehash: bool) -> Edit:
    """Replace model.onnx; with `rehash`, also record its new sha256 and size."""

    def apply(bundle: Path) -> None:
        (bundle / "model.onnx").write_bytes(data)
        if rehash:
            entry = {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()}
            edit_manifest(lambda m: m["variants"]["fp32"].update(entry, size=len(data)))(bundle)

    return apply


def remove(name: str) -> Edit:
    return lambda bundle: (bundle / name).unlink()


def write_text(name: str, text: str) -> Edit:
    return lambda bundle: (bundle / name).write_text(text)


def append_to_model(bundle: Path) -> None:
    with (bundle / "model.onnx").open("ab") as f:
        f.write(b"\0")


# name -> (how to break a good bundle, what the refusal must say)
MANIFEST_CASES: dict[str, tuple[Edit, str]] = {
    "missing-manifest": (remove("manifest.json"), "no manifest.json in"),
    "invalid-json": (write_text("manifest.json", '{"name": "tiny",'), "not valid JSON"),
    "not-utf8": (lambda b: (b / "manifest.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"),
    "missing-labels": (edit_manifest(lambda m: m.pop("labels")), "labels: Field required"),
    "empty-labels": (edit_manifest(lambda m: m.update(labels=[])), "labels: List should have"),
    "std-zero": (set_input(std=[0.0]), "std values must be positive"),
    "colour-vs-channels": (set_input(color="RGB"), "color 'RGB' does not match channels=1"),
    "mean-per-channel": (set_input(mean=[0.5, 0.5]), "one value per channel"),
    "unknown-input-key": (set_input(colour="L"), "input.colour: Extra inputs"),
    "bad-size": (set_input(height=0), "input.height"),
    "schema-3": (edit_manifest(lambda m: m.update(schema=3)), "schema 3 is not supported"),
    "no-fp32": (
        edit_manifest(lambda m: m["variants"].update(int8=m["variants"].pop("fp32"))),
        "variants must include fp32",
    ),
    "bad-sha256-format": (
        edit_manifest(lambda m: m["variants"]["fp32"].update(sha256="abc")),
        "variants.fp32.sha256",
    ),
    "bad-name": (edit_manifest(lambda m: m.update(name="../x")), "name: String should match"),
}
VARIANT_CASES: dict[str, tuple[Edit, str]] = {
    "missing-variant-file": (remove("model.onnx"), "variant fp32 file missing"),
    "sha256-mismatch": (append_to_model, "sha256 mismatch for variant fp32"),
}
SESSION_CASES: dict[str, tuple[Edit, str]] = {
    "unloadable-onnx": (
        write_model(b"these bytes are not an ONNX model", rehash=True),
        "ONNX Runtime cannot load",
    ),
    "wrong-input-name": (set_input(name="pixels"), "no input named 'pixels'"),
    "labels-vs-outputs": (
        edit_manifest(lambda m: m.update(labels=LABELS[:3])),
        "10 classes but the manifest has 3 labels",
    ),
}


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_invalid_manifest_is_refused(pristine, tmp_path, name):
    edit, message = MANIFEST_CASES[name]
    bundle = copy_of(pristine, tmp_path)
    edit(bundle)
    with pytest.raises(BundleError, match="manifest") as refused:
        load_bundle(bundle)
    assert message in str(refused.value)


@pytest.mark.parametrize("name", VARIANT_CASES)
def test_variant_file_is_verified(pristine, tmp_path, name):
    edit, message = VARIANT_CASES[name]
    bundle = copy_of(pristine, tmp_path)
    edit(bundle)
    loaded = load_bundle(bundle)  # the manifest itself is fine
    with pytest.raises(BundleError) as refused:
        verify_variant(loaded, "fp32")
    assert message in str(refused.value)


def test_valid_bundle_loads(pristine):
    bundle = load_bundle(pristine)
    assert bundle.directory == pristine
    assert bundle.manifest.name == "tiny" and bundle.manifest.labels == LABELS
    assert verify_variant(bundle, "fp32") == pristine / "model.onnx"
    # extra top-level keys are kept (forward compatibility) and the manifest round-trips
    raw = json.loads((pristine / "manifest.json").read_text())
    manifest = Manifest.model_validate({**raw, "future": {"x": 1}})
    assert json.loads(manifest.dump())["future"] == {"x": 1}
    assert Manifest.model_validate_json(manifest.dump()) == manifest


def test_latest_symlink(pristine, tmp_path):
    name_dir = tmp_path / "repository" / "tiny"
    shutil.copytree(pristine, name_dir / "1")
    shutil.copytree(pristine, name_dir / "2")
    (name_dir / "latest").symlink_to("2")
    assert resolve_bundle_dir(name_dir) == (name_dir / "2").resolve()
    assert load_bundle(name_dir).directory == (name_dir / "2").resolve()
    shutil.rmtree(name_dir / "2")  # now dangling
    with pytest.raises(BundleError, match="points to 2, which does not exist"):
        load_bundle(name_dir)


def test_latest_pointer_file(pristine, tmp_path):
    name_dir = tmp_path / "repository" / "tiny"
    shutil.copytree(pristine, name_dir / "1")
    (name_dir / "latest").write_text("1\n")
    assert load_bundle(name_dir).directory == name_dir / "1"
    (name_dir / "latest").write_text("7\n")
    with pytest.raises(BundleError, match="names version '7', which is not in"):
        load_bundle(name_dir)
    (name_dir / "latest").write_text("")
    with pytest.raises(BundleError, match="names version ''"):
        load_bundle(name_dir)


def test_a_bundle_directory_wins_over_latest(pristine, tmp_path):
    bundle = copy_of(pristine, tmp_path)
    (bundle / "latest").write_text("nonsense")
    assert load_bundle(bundle).directory == bundle


def test_missing_path(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="manifest missing"):
        read_manifest(tmp_path)


# --- `blink serve` refuses to start -------------------------------------------------------


def serve(model: Path, *args: str, **env: str) -> tuple[int, str, float]:
    """Run `python -m app serve` and return (exit code, stderr, seconds); it must not serve."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BLINK_", "PROM"))}
    environment.update(env)
    command = [sys.executable, "-m", "app", "serve", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(free_port()), *args]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stderr, time.monotonic() - started


def check_refused(returncode: int, stderr: str, message: str) -> None:
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("blink: cannot serve: "), stderr
    assert message in lines[-1], stderr
    assert "Traceback" not in stderr


CLI_CASES = {
    **MANIFEST_CASES,
    **VARIANT_CASES,
    **SESSION_CASES,
    "variant-not-in-bundle": (lambda bundle: None, "variant 'int8' is not in the bundle"),
}
NEEDS_ENV = {"variant-not-in-bundle": {"BLINK_MODEL_VARIANT": "int8"}}
# each case starts a Python process; the manifest cases are covered one by one above, so the
# CLI runs a representative few of them and every variant and session case
CLI_RUN = [
    "missing-manifest",
    "invalid-json",
    "missing-labels",
    "std-zero",
    "colour-vs-channels",
    *VARIANT_CASES,
    *SESSION_CASES,
    "variant-not-in-bundle",
]


@pytest.mark.parametrize("name", CLI_RUN)
def test_serve_refuses_a_broken_bundle(pristine, tmp_path, name):
    edit, message = CLI_CASES[name]
    bundle = copy_of(pristine, tmp_path)
    edit(bundle)
    returncode, stderr, _ = serve(bundle, **NEEDS_ENV.get(name, {}))
    check_refused(returncode, stderr, message)


def test_serve_refuses_with_several_workers(pristine, tmp_path):
    """uvicorn's parent would exit 0 if the workers failed instead: the CLI must catch it."""
    edit, message = SESSION_CASES["unloadable-onnx"]
    bundle = copy_of(pristine, tmp_path)
    edit(bundle)
    returncode, stderr, _ = serve(bundle, "--workers", "2")
    check_refused(returncode, stderr, message)


def test_serve_refuses_a_missing_path_and_bad_settings(pristine, tmp_path):
    check_refused(*serve(tmp_path / "nowhere")[:2], "does not exist")
    returncode, stderr, _ = serve(pristine, BLINK_MAX_BATCH_SIZE="0")
    assert returncode != 0
    assert "invalid settings" in stderr and "max_batch_size" in stderr


def test_serve_follows_latest(pristine, tmp_path):
    name_dir = tmp_path / "repository" / "tiny"
    shutil.copytree(pristine, name_dir / "3")
    (name_dir / "latest").write_text("3")
    with live_server(name_dir) as url:
        (model,) = httpx.get(url + "/v1/models", timeout=10).json()["models"]
    assert (model["name"], model["version"]) == ("tiny", "1")  # the manifest's own version
