#!/usr/bin/env bash
# Regenerates the lock files in requirements/ from pyproject.toml: every package pinned with its
# hashes, for Python 3.11 on Linux x86-64. Run it after changing a dependency, commit the result.
# Run it with the oldest Python the locks must install on, Debian 12's python3 (3.11.2): some
# releases need a later 3.11 (pymdown-extensions 13 needs 3.11.5), and a lock made on a newer
# Python picks them. `PYTHON=/usr/bin/python3 bash scripts/setup.sh` makes such a .venv.
#   bash scripts/lock.sh                   keep the locked versions that still satisfy pyproject
#   bash scripts/lock.sh --upgrade         move everything to the newest allowed versions
# torch is left out of the hashes (listed as "unsafe" at the end of each file) because its CPU
# build comes from a local wheel directory or PyTorch's own index; scripts/setup.sh installs it
# first, pinned by version (torch==2.13.0 in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" - <<'CHECK'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"lock.sh: the locks are for CPython 3.11; {sys.executable} is {sys.version.split()[0]}")
if sys.version_info[2] > 2:
    print(f"lock.sh: {sys.version.split()[0]} is newer than Debian 12's 3.11.2: the locks may pick "
          "releases that need it", file=sys.stderr)
CHECK
compile() {  # compile OUTPUT [EXTRA...]
  local out="$1"; shift
  local extras=(); for extra in "$@"; do extras+=(--extra "$extra"); done
  CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$PYTHON" -m piptools compile --quiet \
    --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
    --unsafe-package torch "${extras[@]}" "${LOCK_FLAGS[@]}" -o "$out" pyproject.toml
}
LOCK_FLAGS=("$@")
compile requirements/runtime.txt                               # the runtime image
compile requirements/build.txt build pretrained                # the image's build stage
compile requirements/loadtest.txt loadtest                     # the Locust image
compile requirements/dev.txt build pretrained dev loadtest     # scripts/setup.sh
