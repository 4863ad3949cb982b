#!/usr/bin/env bash
# The test command: sets up .venv (once), then runs the same gates as CI —
# ruff, mypy, and the whole pytest suite against the compiled _core and again
# against the pure-Python twins (PADDLER_NO_EXTENSIONS=1).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
setup_venv test

"$VENV/bin/ruff" format --check paddler tests benchmarks
"$VENV/bin/ruff" check paddler tests benchmarks
"$VENV/bin/mypy"

export PYTHONFAULTHANDLER=1
echo "== pytest, compiled _core =="
"$VENV/bin/python" -c 'import paddler._core as c; assert c.IMPLEMENTATION == "c", "extensions not built"'
"$VENV/bin/python" -m pytest -q "$@"
echo "== pytest, pure-Python _core (PADDLER_NO_EXTENSIONS=1) =="
PADDLER_NO_EXTENSIONS=1 "$VENV/bin/python" -m pytest -q "$@"
