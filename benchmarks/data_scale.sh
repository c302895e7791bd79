#!/bin/bash
# Issue 10's table: time to the end of step 1 and summed PSS for 200 and 100k pairs (2 ranks,
# dist_timeout_s 60, each run preparing its own fresh cache), and `dpo-ds prepare` of 1M pairs with 1 and 2
# tokenizer processes, then a 2-rank run on 1M pairs to step 1. Results: one JSON line each in OUT/results.jsonl.
#
#   benchmarks/data_scale.sh [OUT]     (default /tmp/dpo-ds-data-scale; ~5 GB of pairs for 1M)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dpo-ds-data-scale}
PY=${PYTHON:-.venv/bin/python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} MASTER_ADDR=127.0.0.1
mkdir -p "$OUT"
[[ -f $OUT/model/config.json ]] || "$PY" benchmarks/data_scale.py assets "$OUT"
for n in 200 100000; do
    "$PY" benchmarks/data_scale.py train "$OUT" "$n" --dist_timeout_s 60 | tee -a "$OUT/results.jsonl"
done
for workers in 1 2; do
    "$PY" benchmarks/data_scale.py prepare "$OUT" 1000000 --workers "$workers" | tee -a "$OUT/results.jsonl"
done
"$PY" benchmarks/data_scale.py train "$OUT" 1000000 --dist_timeout_s 60 | tee -a "$OUT/results.jsonl"
