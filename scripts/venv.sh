# Sourced by the scripts: the virtual environment scripts/setup.sh installs into, first on PATH.
# An active environment ($VIRTUAL_ENV) is used as it is; BLINK_VENV names another one.
VENV="${BLINK_VENV:-${VIRTUAL_ENV:-.venv}}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # absolute: it stays right after a cd
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
