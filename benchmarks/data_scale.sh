#!/bin/bash
# The data path at scale (issue 10). Results: one JSON line each in OUT/results.jsonl.
#
#   benchmarks/data_scale.sh [OUT] [table|cores|1m|all]     (default OUT /tmp/dpo-ds-data-scale, default all)
#
#   table  the issue's table: a 200-pair and a 100k-pair 2-rank `train`, each preparing its own fresh cache,
#          dist_timeout_s 60, ~590-token pairs, 32k byte-level BPE: time to the end of step 1 and peak summed
#          PSS of all processes. DeepSpeed's CPU op is built first, untimed (`ops_build_s`), in OUT/torch_extensions.
#   cores  `dpo-ds prepare` of 5,000 pairs with 1 and 2 tokenizer processes (scaling with cores).
#   1m     `dpo-ds prepare` of 1M pairs (WORDS_1M words per field, default 19: ~73 tokens per pair; 190 gives
#          ~590 tokens and 3.2 GB of JSONL), then a 2-rank `train` on that cache to step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dpo-ds-data-scale}
WHAT=${2:-all}
PY=${PYTHON:-.venv/bin/python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} MASTER_ADDR=127.0.0.1
mkdir -p "$OUT"
[[ -f $OUT/model/config.json ]] || "$PY" benchmarks/data_scale.py assets "$OUT"
if [[ $WHAT == table || $WHAT == all ]]; then
    for n in 200 100000; do
        "$PY" benchmarks/data_scale.py train "$OUT" "$n" --dist_timeout_s 60 | tee -a "$OUT/results.jsonl"
    done
fi
if [[ $WHAT == cores || $WHAT == all ]]; then
    for workers in 1 2; do
        "$PY" benchmarks/data_scale.py prepare "$OUT" 5000 --workers "$workers" | tee -a "$OUT/results.jsonl"
    done
fi
if [[ $WHAT == 1m || $WHAT == all ]]; then
    WORDS_1M=${WORDS_1M:-19}
    "$PY" benchmarks/data_scale.py prepare "$OUT" 1000000 --workers 2 --words "$WORDS_1M" | tee -a "$OUT/results.jsonl"
    cache=$(tail -1 "$OUT/results.jsonl" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['cache'])")
    "$PY" benchmarks/data_scale.py train "$OUT" 1000000 --dist_timeout_s 60 --cache_dir "$cache" --words "$WORDS_1M" \
        | tee -a "$OUT/results.jsonl"
fi
