#!/bin/bash
# Sequence parallelism on CPU ranks (issue 21): peak memory per rank (RSS, from `dpo-ds bench --json`) and step
# time of one DPO step on one pair of two equally long sequences, at S = 1 (1 rank) and S = 2 (2 ranks sharing
# the pair), for a Llama of 32k vocabulary (benchmarks/configs/llama-32k-vocab: hidden 256, 2 layers, 18.5 M
# params; fp32, live reference, gradient checkpointing, fused lm_head). Lengths 64 (the process's baseline:
# libraries, model states), 8192 and 16384 tokens per sequence (16k- and 32k-token pairs). Each point twice: with
# glibc malloc's defaults ("glibc") and with MALLOC_MMAP_THRESHOLD_=1048576 ("mmap1m": every block of 1 MiB or
# more is mmapped and unmapped when freed; without it glibc raises its threshold to the largest block freed so
# far, up to 32 MiB, serves later blocks below it from its heaps and keeps them resident after they are freed,
# so peak RSS counts freed activation memory; BENCHMARKS.md section 13).
# MODEL (a preset such as llama-60m, or a config.json) and LENGTHS (tokens per sequence) choose another model and
# other lengths, MALLOCS="mmap1m" one allocator setting; ZeRO-3, gradient checkpointing and padded rows are asked
# for explicitly (at S = 1 their `auto` defaults would pick stage 0, maybe no recompute, and packed rows, which
# S = 2 does not use, for a small model).
#   [MODEL=llama-60m LENGTHS="64 8192" MALLOCS=mmap1m] benchmarks/long_context.sh [results_dir]
set -u
cd "$(dirname "$0")/.."
R=${1:-benchmarks/results/long_context}; mkdir -p "$R"; : > "$R/commands.txt"
MODEL=${MODEL:-benchmarks/configs/llama-32k-vocab/config.json}; LENGTHS=${LENGTHS:-64 8192 16384}
MALLOCS=${MALLOCS:-glibc mmap1m}
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
run() {
  local name=$1 ranks=$2 length=$3 malloc=$4; shift 4
  local cmd=(.venv/bin/python -m torch.distributed.run --nproc_per_node "$ranks" --master_addr 127.0.0.1
             --master_port 29655 -m dpo_ds bench --model "$MODEL"
             --lengths "fixed:$length" --max_length "$length" --precision fp32 --gradient_checkpointing true --zero_stage 3
             --padding_free false
             --warmup 0 --steps 1 --json --output_dir "/tmp/dpo-ds-bench-$name" --sequence_parallel_size "$ranks")
  local envs=(); [ "$malloc" = mmap1m ] && envs=(MALLOC_MMAP_THRESHOLD_=1048576)
  echo "== $name: ${envs[*]} ${cmd[*]}" | tee -a "$R/commands.txt"
  env "${envs[@]}" "${cmd[@]}" > "$R/$name.json" 2> "$R/$name.log" || echo "   failed, see $R/$name.log"
  tail -n 1 "$R/$name.json"
}
for length in $LENGTHS; do
  for malloc in $MALLOCS; do
    run "${malloc}_s1_len$length" 1 "$length" "$malloc"
    run "${malloc}_s2_len$length" 2 "$length" "$malloc"
  done
done
