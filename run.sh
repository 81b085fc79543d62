#!/usr/bin/env bash
# One entry point that sets up what it needs and then runs:
#   bash run.sh demo [OPTIONS]   the whole pipeline on synthetic data (latte demo)
#   bash run.sh test             ruff and the whole test suite
#   bash run.sh latte ARGS...    any latte command
# It uses the active virtual environment if there is one (bring your own CUDA torch that way), else it
# creates .venv here. Where no torch is importable it installs the CPU build torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")"

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    PY=.venv/bin/python
fi
BIN="$(dirname "$PY")"

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
STAMP="$BIN/../.latte-installed"
if [[ ! -f "$STAMP" ]] || ! cmp -s pyproject.toml "$STAMP"; then
    "$PY" -m pip install -q -e ".[test]"
    cp pyproject.toml "$STAMP"
fi

cmd="${1:-demo}"; shift || true
case "$cmd" in
    demo) exec "$BIN/latte" demo "$@" ;;
    test) "$BIN/ruff" check . && exec "$PY" -m pytest -q "$@" ;;
    latte) exec "$BIN/latte" "$@" ;;
    *) echo "usage: bash run.sh demo|test|latte ARGS..." >&2; exit 2 ;;
esac
