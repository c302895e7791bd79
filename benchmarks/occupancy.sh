#!/bin/bash
# Token occupancy (real / processed tokens, from `dpo-ds bench --json`) on log-normal lengths
# (lognormal:256,0.6 clipped to [16, 1024]), micro batch 4 pairs, 16 timed steps (64 pairs). Occupancy does not
# depend on the model, so a tiny Llama config (benchmarks/configs/llama-tiny-8k) keeps the runs short.
#   benchmarks/occupancy.sh [results_dir]
set -u
cd "$(dirname "$0")/.."
R=${1:-benchmarks/results/occupancy}; mkdir -p "$R"; : > "$R/order.txt"; : > "$R/commands.txt"
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
LENGTHS=${LENGTHS:-lognormal:256,0.6}; BUDGET=${BUDGET:-4096}
run() {
  local name=$1; shift
  echo "$name" >> "$R/order.txt"
  local cmd=(.venv/bin/python -m dpo_ds bench --model benchmarks/configs/llama-tiny-8k --lengths "$LENGTHS" --max_length 1024
             --precision fp32 --micro_batch_size 4 --warmup 0 --steps 16 --json --output_dir /tmp/dpo-ds-bench "$@")
  echo "== $name: ${cmd[*]}" | tee -a "$R/commands.txt"
  /usr/bin/time -v -o "$R/$name.time" "${cmd[@]}" > "$R/$name.json" 2> "$R/$name.log" || echo "   failed, see $R/$name.log"
  tail -n 1 "$R/$name.json"
}
run right_padding --padding_free false
run group_by_length --group_by_length true --padding_free false
run token_budget$BUDGET --group_by_length true --max_tokens_per_micro_batch "$BUDGET" --padding_free false
run padding_free --padding_free true
.venv/bin/python benchmarks/summarize.py "$R" | tee "$R/summary.md"
