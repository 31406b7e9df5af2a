#!/usr/bin/env bash
# Install everything, lint, and run the whole test suite (slow tests included).
#   bash scripts/test.sh                 everything, as CI runs it
#   bash scripts/test.sh -m "not slow"   the fast suite (under 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
ruff check .
ruff format --check .
exec python3 -m pytest "$@"
