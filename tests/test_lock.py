"""The lock files in requirements/ cover pyproject.toml: every dependency pinned, in range.

`bash scripts/lock.sh` regenerates them; this fails when a dependency was added or its range
changed without regenerating, before an install or an image build would.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# lock file -> the extras it holds (beside the runtime dependencies)
LOCKS = {
    "runtime.txt": (),
    "build.txt": ("build", "pretrained"),
    "loadtest.txt": ("loadtest",),
    "dev.txt": ("build", "pretrained", "dev", "loadtest"),
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ \\]+)", re.MULTILINE)
# installed first by scripts/setup.sh, pinned by version: its CPU build is not on PyPI
UNHASHED = {"torch"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def locked(name: str) -> dict[str, str]:
    text = (ROOT / "requirements" / name).read_text()
    return {canonicalize_name(n): v for n, v in PIN.findall(text)}


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_dependency_within_its_range(lock: str) -> None:
    meta = project()
    wanted = [Requirement(r) for r in meta["dependencies"]]
    for extra in LOCKS[lock]:
        wanted += [Requirement(r) for r in meta["optional-dependencies"][extra]]
    pins = locked(lock)
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name in UNHASHED:
            continue
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside {req.specifier}")
    assert not problems, f"requirements/{lock}: {problems}; run `bash scripts/lock.sh`"


def test_every_pin_has_hashes() -> None:
    for lock in LOCKS:
        text = (ROOT / "requirements" / lock).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n# The following")[0])
        for entry in entries:
            if PIN.match(entry):
                assert "--hash=sha256:" in entry, f"{lock}: no hash for {entry.splitlines()[0]}"


def test_torch_is_pinned_exactly_and_left_out_of_the_hashes() -> None:
    assert "torch==2.13.0" in project()["optional-dependencies"]["build"]
    for lock in ("build.txt", "dev.txt"):
        assert "torch" not in locked(lock), f"{lock} pins torch with hashes"
