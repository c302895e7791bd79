#!/bin/bash
# How cost grows: (a) 1k/2k/4k/8k tokens per sequence, fixed lengths, 1 pair per micro-batch (2 sequences),
# (b) 1 vs 2 CPU ranks (torch.distributed.run, 127.0.0.1) at fixed:1024, same per-rank work.
# Model: benchmarks/configs/llama-tiny-8k (Llama, hidden 256, 4 layers, 4 heads, vocab 8192, ~7.4M params):
# small enough that an 8k-token pair finishes on this 2-core VM. fp32, live reference, gradient checkpointing.
#   benchmarks/scaling.sh [results_dir]       env: LENS="1024 2048 4096 8192", WARMUP=1, STEPS=2
set -u
cd "$(dirname "$0")/.."
R=${1:-benchmarks/results/scaling}; mkdir -p "$R"; : > "$R/order.txt"; : > "$R/commands.txt"
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
LENS=${LENS:-1024 2048 4096 8192}; WARMUP=${WARMUP:-1}; STEPS=${STEPS:-2}
ARGS=(--model benchmarks/configs/llama-tiny-8k --precision fp32 --micro_batch_size 1 --warmup "$WARMUP" --steps "$STEPS"
      --json --output_dir /tmp/dpo-ds-bench)
run() {
  local name=$1; shift
  echo "$name" >> "$R/order.txt"
  echo "== $name: $*" | tee -a "$R/commands.txt"
  /usr/bin/time -v -o "$R/$name.time" "$@" > "$R/$name.json" 2> "$R/$name.log" || echo "   failed, see $R/$name.log"
  tail -n 1 "$R/$name.json"
}
for T in $LENS; do
  run "fixed${T}_1rank" .venv/bin/python -m dpo_ds bench "${ARGS[@]}" --lengths "fixed:$T" --max_length "$T"
done
run "fixed1024_2ranks" .venv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29517 \
    -m dpo_ds bench "${ARGS[@]}" --lengths fixed:1024 --max_length 1024
.venv/bin/python benchmarks/summarize.py "$R" | tee "$R/summary.md"
