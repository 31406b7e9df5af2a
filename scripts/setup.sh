#!/usr/bin/env bash
# Installs everything Blink needs on a fresh Debian machine into a virtual environment in the
# repository, `.venv` (idempotent; root or sudo for the Debian packages).
#   bash scripts/setup.sh            runtime + build + pretrained + dev + loadtest, dataset, tools
#   bash scripts/setup.sh --test     also what the container and browser checks need (docker.io,
#                                    debootstrap, chromium, chromium-driver)
#   bash scripts/setup.sh --build    only what the offline build needs: the dataset, torch and the
#                                    build extra (the Dockerfile's build stage)
# Environment:
#   PYTHON       the interpreter that creates the environment (default python3; 3.11 or newer).
#                Debian's own python3 works: the environment sidesteps its "externally managed"
#                marker (PEP 668), and python3-venv is installed when venv is missing.
#   BLINK_VENV   where the environment goes (default: an active one, $VIRTUAL_ENV, else .venv)
# Versions come from the lock files in requirements/ (hashes checked); torch is pinned by version.
# Activate the environment with `source .venv/bin/activate`; scripts/serve.sh and test.sh use it.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_PACKAGES=(dataset-fashion-mnist prometheus wrk)
LOCK=requirements/dev.txt
case "${1:-}" in
  --test) APT_PACKAGES+=(docker.io debootstrap chromium chromium-driver) ;;
  --build) APT_PACKAGES=(dataset-fashion-mnist); LOCK=requirements/build.txt ;;
esac

PYTHON="${PYTHON:-python3}"
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: $PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
# Debian splits venv (and the pip it bootstraps) out of python3 into python3.X-venv.
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  APT_PACKAGES+=("python3-venv" "$("$PYTHON" -c 'import sys; print("python3.%d-venv" % sys.version_info[1])')")
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

# Skip the install when nothing it depends on changed since the last one (serve.sh and test.sh
# call this every time).
stamp="$VENV/.blink-installed"
wanted="$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1) $LOCK"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
# torch first, by version (its CPU build comes from a local wheel directory or PyTorch's index,
# whose files and hashes differ from PyPI's): then nothing can resolve a CUDA build of it.
"${PIP[@]}" install "torch==2.13.0"
# Everything else exactly as locked, hashes checked; the lock is complete, so no resolving.
"${PIP[@]}" install --require-hashes --no-deps -r "$LOCK"
"${PIP[@]}" install --no-deps -e .
"${PIP[@]}" check
echo "$wanted" > "$stamp"
