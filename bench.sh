#!/usr/bin/env bash
# Benchmarks: ./bench.sh (about 40 minutes here, 10 of them the soak, 7-8 the comparison
# with llama-server, which is built once first: about 7 minutes more) or ./bench.sh quick
# (about 7).
# Sets up .venv like test.sh, then runs benchmarks/run.py, which writes
# benchmarks/results/{summary.md,*.json,*.png} and prints the summary.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
setup_venv test,bench

case "${1:-full}" in
    quick) exec "$VENV/bin/python" -m benchmarks.run --quick ;;
    full) exec "$VENV/bin/python" -m benchmarks.run ;;
    *) echo "usage: ./bench.sh [quick|full]" >&2; exit 2 ;;
esac
