#!/bin/bash
# dpo-ds bench: LoRA r 16 (all linear layers) and QLoRA (the same over an nf4 base) vs full fine-tuning on the
# same random-init llama-60m, CPU fp32, one process, live reference in all (LoRA: the same engine with the adapter
# off; full: a second ZeRO-3 engine).
# Usage: [VARIANTS="full lora_r16 qlora_r16"] benchmarks/lora_vs_full.sh OUT_DIR
#        (JSON lines + the machine's load before and after each run)
set -eu
OUT=${1:-benchmarks/results/lora_vs_full}; mkdir -p "$OUT"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
PY=${PY:-.venv/bin/python}
COMMON=(--model llama-60m --lengths fixed:128 --max_length 128 --precision fp32 --micro_batch_size 2 --warmup 1
        --steps 3 --json --output_dir /tmp/dpo-ds-bench)
: > "$OUT/results.jsonl"; : > "$OUT/commands.txt"
for variant in ${VARIANTS:-full lora_r16 qlora_r16}; do
  case $variant in
    full) extra=() ;;
    lora_r16) extra=(--lora_r 16) ;;
    qlora_r16) extra=(--lora_r 16 --lora_quantize nf4) ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  echo "$PY -m dpo_ds bench ${COMMON[*]} ${extra[*]}" >> "$OUT/commands.txt"
  echo "$variant before: $(cat /proc/loadavg)" >> "$OUT/load.txt"
  line=$("$PY" -m dpo_ds bench "${COMMON[@]}" "${extra[@]}" 2>> "$OUT/log.txt" | tail -n 1)
  echo "$variant after: $(cat /proc/loadavg)" >> "$OUT/load.txt"
  echo "{\"run\": \"$variant\", \"result\": $line}" >> "$OUT/results.jsonl"
done
cat "$OUT/results.jsonl"
