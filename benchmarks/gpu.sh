#!/bin/bash
# GPU checks and benchmarks, in phases, each with its own time budget; nothing is compiled but DeepSpeed's
# FusedAdam, measured only where nvcc can build it (the default preset is torch's fused AdamW).
#
#   bash benchmarks/gpu.sh [--dry-run] [PHASE ...]      PHASE: checks train bench trl (default: all four)
#
# checks (60 s)   NCCL through `python -m launcher.dist`; benchmarks/gpu_checks.py (NCCL helpers, no device sync per
#                 micro-step, pinned-memory release)
# bench (395 s)   `dpo-ds bench` on llama-1b, bf16, zero_stage auto, 2 warm-up + 3 timed steps, one phase each:
#   mfu_2k_live_ref, mfu_2k_precompute_ref (50 s each)     2048-token sequences, micro batch 4 (16k tokens a
#                 micro-step), live reference | precompute_ref
#   mfu_8k_live_ref, mfu_8k_precompute_ref (55 s each)     8192-token sequences, micro batch 1 (16k tokens)
#   zero3_2k_precompute_ref (45 s)       as mfu_2k_precompute_ref at zero_stage 3 (auto picks a lower stage on one
#                 GPU), with torch's fused AdamW (ds_configs/zero3.json)
#   long_32k_pair_tiled_mlp (70 s)       issue 21: one 32k-token pair (two 16384-token sequences) on one GPU, S=1,
#                 tiled_mlp, precompute_ref; 1 warm-up + 2 timed steps: tokens/s and peak memory
#   zero3_fused_adam_2k_precompute_ref (70 s)   the zero3 run with DeepSpeed's FusedAdam
#                 (ds_configs/zero3_fused_adam.json; its build is in the time; skipped without nvcc)
# trl (60 s)      TRL's DPOTrainer on the bench phase's model and 2k pairs (needs trl + datasets)
# train (120 s)   a short run on the demo assets (checkpoints, eval pairs, final/), `dpo-ds convert`, `dpo-ds eval`,
#                 one QLoRA step (when bitsandbytes is importable), a precompute_ref + padding_free run
# A step's time limit is the smaller of its own and what is left of its phase; a step that cannot start with
# 30 s left writes a "skipped" line. Every step writes one JSON line to $OUT/results.jsonl (its output goes to
# $WORK/steps/NAME.log and $OUT/log.txt); the summary at the end (benchmarks/gpu_summary.py) reads them back, with
# each benchmark's and check's own JSON result, into $OUT/summary.json and a table on stdout, each benchmark's
# measured MFU and step time next to `dpo-ds plan`'s projection for its shape (its FLOPs at the assumed MFU).
# The budgets are estimates (no GPU has run this script yet): a bench step is mostly start-up (imports, the
# random-init model written once to $WORK/bench and shared by all, DeepSpeed's initialization), its few steps
# take seconds.
#
# The device tool gives a session 15 minutes of device time in all (the machine's start-up of a few minutes
# included) and 10 minutes a call: one call holds what matters most (checks, bench and trl: 515 s of budgets,
# plus the wheel install, `dpo-ds env` and the summary), and the train phase follows only if that leaves time, at
# once (while the machine is still warm, 30 s), when status says budget_left_s >= 200:
#   run(command="bash benchmarks/gpu.sh checks bench trl", carry=[".whl"], timeout_s=600)
#   run(command="bash benchmarks/gpu.sh train", carry=[".whl"], timeout_s=170)
# Left out to fit that time (earlier versions had them): the full-logits path (--fused_lm_head false), LoRA r 16
# and log-normal lengths with padding_free as benchmarks, whose CPU measurements are in BENCHMARKS.md.
# Work files (the 2 GB bench model, checkpoints, step logs) go to $WORK, by default outside $OUT
# (/tmp/dpo-ds-gpu-work), since the device tool brings back at most 8 files from $OUT.
#
# --dry-run: the same phases and steps on the CPU (DS_ACCELERATOR=cpu, gloo, one rank, the tiny demo model,
# llama-tiny-8k at 64/128/256 tokens for the benchmarks, MFU against a nominal 1 TFLOP/s peak so the
# projection is computed too): proves the plumbing before a GPU runs it (tests/test_gpu_sh.py). It uses the
# calling Python ($PYTHON) as it is; nothing is installed; $WORK defaults to $OUT/work. Every budget is
# multiplied by BUDGET_SCALE (default 1; 4 in a dry run: a 2-core CPU runs the tiny steps slower than a GPU
# runs the real ones).
#
# Carried wheels (.whl, under the device tool's 64 MiB): ../shared/device-wheels.sh puts deepspeed 0.19.8 (a
# pure-Python wheel built here, ~2 MB) and its small dependencies (hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions: ~3 MB); `--with-trl` adds trl, datasets, dill,
# multiprocess (~1.5 MB); bitsandbytes==0.50.2 (43 MB) for the QLoRA step is optional. Before calling the tool:
#   grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
#   ../shared/device-wheels.sh --with-trl
set -u
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
PHASES=("$@"); (( ${#PHASES[@]} )) || PHASES=(checks bench trl train)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/dpo-ds-gpu-bench}; mkdir -p "$OUT"
RES=$OUT/results.jsonl; LOG=$OUT/log.txt; : > "$RES"; : > "$LOG"
T0=$(date +%s)
export TOKENIZERS_PARALLELISM=false

SCALE=${BUDGET_SCALE:-$(( DRY ? 4 : 1 ))}
if (( DRY )); then
  export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  WORK=${WORK:-$OUT/work}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
  NGPU=1; PRECISION=fp32; MODEL=benchmarks/configs/llama-tiny-8k; LEN=64; MBS=1; LEN_8K=128; LEN_32K_PAIR=256
  WARMUP=1; STEPS=1; PEAK=(--peak_tflops 1); TRAIN_STEPS=2
else
  WORK=${WORK:-/tmp/dpo-ds-gpu-work}
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
    || echo "wheel install failed" | tee -a "$LOG"
  export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
  # NCCL allows one rank per GPU: 2 ranks with two GPUs, else 1
  NGPU=$("$PYTHON" -c "import torch; print(max(1, min(torch.cuda.device_count(), 2)))" 2>> "$LOG" || echo 1)
  PRECISION=bf16; MODEL=llama-1b; LEN=2048; MBS=4; LEN_8K=8192; LEN_32K_PAIR=16384
  WARMUP=2; STEPS=3; PEAK=(); TRAIN_STEPS=4  # the peak: looked up from the device's name (dpo_ds.plan.compute)
fi
STEPS_DIR=$WORK/steps; mkdir -p "$WORK" "$STEPS_DIR"  # steps/NAME.log: one step's output
"$PYTHON" -m dpo_ds env >> "$LOG" 2>&1
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU")

PHASE=none; PHASE_END=$T0
phase() {  # name, budget in seconds (times SCALE)
  PHASE=$1; PHASE_END=$(( $(date +%s) + $2 * SCALE ))
  echo "{\"phase\": \"$1\", \"budget_s\": $(( $2 * SCALE ))}" >> "$RES"
}
step() {  # name, own limit in seconds (times SCALE), command...: one JSON line with its exit status and time
  local name=$1 cap=$(( $2 * SCALE )); shift 2
  local left=$(( PHASE_END - $(date +%s) ))
  if (( left < 30 )); then
    echo "{\"phase\": \"$PHASE\", \"run\": \"$name\", \"skipped\": \"phase budget\"}" | tee -a "$RES"; return
  fi
  echo "== $PHASE/$name: $*" >> "$LOG"
  local t0; t0=$(date +%s)
  timeout -k 10 $(( cap < left ? cap : left )) "$@" > "$STEPS_DIR/$name.log" 2>&1
  local rc=$?
  cat "$STEPS_DIR/$name.log" >> "$LOG"
  echo "{\"phase\": \"$PHASE\", \"run\": \"$name\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" | tee -a "$RES"
}
skip() {  # name, reason
  echo "{\"phase\": \"$PHASE\", \"run\": \"$1\", \"skipped\": \"$2\"}" | tee -a "$RES"
}
bench() {  # name (also its phase, bench_NAME), budget, sequence length, micro batch, extra args: the step's line
  # carries dpo-ds bench's JSON result. One output_dir for all: the random-init model is written once, and runs on
  # the same pairs share their precompute_ref cache (computed before the timed steps).
  local name=$1 budget=$2 length=$3 micro_batch=$4; shift 4
  phase "bench_$name" "$budget"
  step "$name" "$budget" "$PYTHON" -m dpo_ds bench --model "$MODEL" --lengths "fixed:$length" --max_length "$length" \
      --precision "$PRECISION" --micro_batch_size "$micro_batch" --warmup "$WARMUP" --steps "$STEPS" --json \
      --output_dir "$WORK/bench" ${PEAK[@]+"${PEAK[@]}"} "$@"
}

D=$WORK/demo
run_checks() {
  phase checks 60
  step launcher.dist 25 "${TORCHRUN[@]}" -m launcher.dist
  step gpu_checks 35 "${TORCHRUN[@]}" benchmarks/gpu_checks.py
}
run_bench() {
  bench mfu_2k_live_ref 50 "$LEN" "$MBS"
  bench mfu_2k_precompute_ref 50 "$LEN" "$MBS" --precompute_ref true
  bench mfu_8k_live_ref 55 "$LEN_8K" 1
  bench mfu_8k_precompute_ref 55 "$LEN_8K" 1 --precompute_ref true
  bench zero3_2k_precompute_ref 45 "$LEN" "$MBS" --precompute_ref true --zero_stage 3
  WARMUP=1 STEPS=2 bench long_32k_pair_tiled_mlp 70 "$LEN_32K_PAIR" 1 --precompute_ref true --tiled_mlp true
  # FusedAdam compiles a CUDA op: only where nvcc can build it (dpo-ds checks before loading), with its own
  # extensions folder, so a build the step limit kills leaves no lock another step waits on
  if (( DRY )); then
    phase bench_zero3_fused_adam_2k_precompute_ref 70
    skip zero3_fused_adam_2k_precompute_ref "dry run: FusedAdam compiles an op"
  elif command -v nvcc > /dev/null; then
    TORCH_EXTENSIONS_DIR=$WORK/fused_adam_extensions bench zero3_fused_adam_2k_precompute_ref 70 "$LEN" "$MBS" \
        --precompute_ref true --deepspeed_config ds_configs/zero3_fused_adam.json
  else
    phase bench_zero3_fused_adam_2k_precompute_ref 70
    skip zero3_fused_adam_2k_precompute_ref "no nvcc"
  fi
}
run_trl() {
  phase trl 60
  if ! "$PYTHON" -c "import trl" >> "$LOG" 2>&1; then skip trl "trl not installed"; return; fi
  local model_dir
  model_dir=$(find "$WORK/bench/bench_model" -mindepth 1 -maxdepth 1 -type d 2> /dev/null | head -n 1)
  if [[ -z $model_dir ]]; then skip trl "no bench model directory (run the bench phase first)"; return; fi
  "$PYTHON" benchmarks/make_pairs.py --lengths "fixed:$LEN" --max_length "$LEN" --micro_batch_size "$MBS" \
      --warmup "$WARMUP" --steps "$STEPS" --out "$WORK/pairs.json" >> "$LOG" 2>&1
  step trl 60 "$PYTHON" benchmarks/trl_dpo.py --model_dir "$model_dir" --pairs "$WORK/pairs.json" \
      --precision "$PRECISION" --max_length "$LEN"
}
run_train() {
  phase train 120
  "$PYTHON" -c "from dpo_ds.demo_data import build_demo_assets; build_demo_assets('$D', n_train=128, n_heldout=16)" \
      >> "$LOG" 2>&1
  local train=(-m dpo_ds train --model_name_or_path "$D/model" --train_file "$D/train.jsonl" --eval_file
               "$D/heldout.jsonl" --max_length 64 --micro_batch_size 4 --max_steps "$TRAIN_STEPS" --save_steps 2 --logging_steps 1
               --precision "$PRECISION")
  step train_live_ref 45 "${TORCHRUN[@]}" "${train[@]}" --output_dir "$WORK/train"
  step convert 20 "$PYTHON" -m dpo_ds convert "$WORK/train/checkpoints/$(printf 'step-%08d' "$TRAIN_STEPS")" "$WORK/convert"
  step eval 25 "$PYTHON" -m dpo_ds eval --model "$WORK/convert" --data "$D/heldout.jsonl" --output "$WORK/eval.jsonl" \
      --precision "$PRECISION"
  # QLoRA: the packed nf4 weights ZeRO-3 sharded, final/ merged into the original base (needs bitsandbytes)
  if "$PYTHON" -c "import bitsandbytes" >> "$LOG" 2>&1; then
    step train_qlora_nf4 35 "${TORCHRUN[@]}" "${train[@]}" --output_dir "$WORK/qlora" --lora_r 8 \
        --lora_quantize nf4 --max_steps 1 --save_steps 1
  else
    skip train_qlora_nf4 "bitsandbytes not installed"
  fi
  step train_precompute_ref_padding_free 35 "${TORCHRUN[@]}" "${train[@]}" --output_dir "$WORK/train_pf" \
      --precompute_ref true --padding_free true
}

for name in "${PHASES[@]}"; do
  case $name in
    checks) run_checks ;; bench) run_bench ;; trl) run_trl ;; train) run_train ;;
    *) echo "gpu.sh: unknown phase '$name' (checks, bench, trl, train)" >&2; exit 2 ;;
  esac
done
"$PYTHON" benchmarks/gpu_summary.py "$OUT" "$STEPS_DIR" | tee -a "$LOG"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
