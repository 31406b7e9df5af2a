#!/usr/bin/env bash
# Install everything, lint, type-check and run the whole test suite (slow tests included).
#   bash scripts/test.sh                 everything, as CI runs it
#   bash scripts/test.sh -m "not slow"   the fast suite (under 5 minutes)
#   bash scripts/test.sh -m unit         the unit tier (under 30 seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ruff check .
ruff format --check .
bash scripts/typecheck.sh
exec python -m pytest "$@"
