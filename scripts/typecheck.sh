#!/usr/bin/env bash
# mypy over app/ (strict) and models/ (basic), as configured in pyproject.toml.
# Until the existing errors are fixed it reports them per module and passes; set
# ENFORCE=1 below (or BLINK_MYPY_ENFORCE=1) to make any error fail CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ENFORCE="${BLINK_MYPY_ENFORCE:-0}"
if output="$(python -m mypy 2>&1)"; then
  echo "$output" | tail -1
  exit 0
fi
echo "$output" | tail -1
echo "mypy errors by module:"
echo "$output" | grep -E '^[^ ]+\.py:[0-9]+: error' | cut -d: -f1 | sort | uniq -c | sort -rn
if [ "$ENFORCE" = 1 ]; then
  echo "$output"
  exit 1
fi
echo "mypy: not enforced yet (BLINK_MYPY_ENFORCE=1 shows every error and fails)"
