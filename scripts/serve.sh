#!/usr/bin/env bash
# The main job on a fresh machine: install, build the default model if there is none, serve it.
#   bash scripts/serve.sh [blink serve options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
if [ ! -e models/repository/fashion-mnist/latest ]; then
  echo "No model bundle yet: building the default Fashion-MNIST model (docs/build.md)..."
  blink build
fi
exec blink serve "$@"
