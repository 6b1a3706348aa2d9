#!/usr/bin/env bash
# Every GPU benchmark and the CUDA tests, in about 8 minutes on one GPU; one table, written as
# OUT_DIR/results.json and OUT_DIR/results.md.
#
#   bash benchmarks/gpu/run.sh OUT_DIR            # on a machine with a CUDA GPU
#   bash benchmarks/gpu/run.sh --smoke OUT_DIR    # the same code on the CPU, tiny sizes, ~1 minute
#
# Runs from the working tree (no install needed) and downloads nothing.
set -euo pipefail

smoke=()
if [[ "${1:-}" == "--smoke" ]]; then
    smoke=(--smoke)
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu/run.sh [--smoke] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"  # before the cd below
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python}" benchmarks/gpu/suite.py "${smoke[@]}" --out "$out"
