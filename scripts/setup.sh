#!/usr/bin/env bash
# Installs everything Blink needs on a fresh Debian machine (idempotent; root or sudo).
#   bash scripts/setup.sh            runtime + build + pretrained + dev + loadtest extras, dataset, tools
#   bash scripts/setup.sh --test     also what the container checks need (docker.io, debootstrap)
#   bash scripts/setup.sh --build    only what the offline build needs: the dataset, torch and the
#                                    build extra (the Dockerfile's build stage)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_PACKAGES=(dataset-fashion-mnist prometheus wrk)
EXTRAS="build,pretrained,dev,loadtest"
case "${1:-}" in
  --test) APT_PACKAGES+=(docker.io debootstrap) ;;
  --build) APT_PACKAGES=(dataset-fashion-mnist); EXTRAS="build,pretrained" ;;
esac
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
# torch is pinned to the CPU build in the build extra; installing it first keeps pip from
# resolving a CUDA build for anything that depends on it.
"$PYTHON" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
