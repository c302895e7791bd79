#!/bin/bash
# Issue 10's table: time to the end of step 1 and summed PSS for 200 and 100k pairs (2 ranks,
# dist_timeout_s 60, each run preparing its own fresh cache); `dpo-ds prepare` of 5k pairs with 1 and 2
# tokenizer processes (scaling with cores); `dpo-ds prepare` of 1M pairs, then a 2-rank run on that cache to
# step 1. Results: one JSON line each in OUT/results.jsonl.
#
#   benchmarks/data_scale.sh [OUT] [WORDS_1M]   (default /tmp/dpo-ds-data-scale; WORDS_1M words per field of
#                                               the 1M pairs: 190 = ~590 tokens per pair, 3 GB; default 19)
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
    "$PY" benchmarks/data_scale.py prepare "$OUT" 5000 --workers "$workers" | tee -a "$OUT/results.jsonl"
done
WORDS_1M=${2:-19}
"$PY" benchmarks/data_scale.py prepare "$OUT" 1000000 --workers 2 --words "$WORDS_1M" | tee -a "$OUT/results.jsonl"
cache=$(tail -1 "$OUT/results.jsonl" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['cache'])")
"$PY" benchmarks/data_scale.py train "$OUT" 1000000 --dist_timeout_s 60 --cache_dir "$cache" --words "$WORDS_1M" | tee -a "$OUT/results.jsonl"
