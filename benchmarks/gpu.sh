#!/bin/bash
# GPU checks and benchmarks, in phases, each with its own time budget; nothing is compiled (the default preset
# is torch's fused AdamW; DeepSpeed's FusedAdam is measured only where nvcc can build it).
#
#   bash benchmarks/gpu.sh [--dry-run] [PHASE ...]      PHASE: checks train bench trl (default: all four)
#
# checks (90 s)  NCCL through `python -m launcher.dist`; benchmarks/gpu_checks.py (NCCL helpers, no device sync per
#                micro-step, pinned-memory release)
# train (300 s)  a short run on the demo assets (checkpoints, eval pairs, final/), a precompute_ref + padding_free
#                run, one QLoRA step (when bitsandbytes is importable), `dpo-ds convert`, `dpo-ds eval`
# bench (70 s each)  llama-1b, 2k tokens, bf16, ZeRO-3, micro batch 4: live offloaded reference | precompute_ref |
#                the same with full logits | LoRA r 16 | log-normal lengths, padding_free; then torch fused AdamW
#                (the default) against DeepSpeed's FusedAdam (ds_configs/zero3_fused_adam.json; skipped without nvcc)
# trl (100 s)    TRL's DPOTrainer on the same model and pairs (needs trl + datasets)
# A step's time limit is the smaller of its own and what is left of its phase; a step that cannot start with
# 30 s left writes a "skipped" line. Every step writes one JSON line to $OUT/results.jsonl (its output goes
# to $OUT/steps/NAME.log and $OUT/log.txt); the summary at the end (benchmarks/gpu_summary.py) reads them back,
# with each benchmark's and check's own JSON result, into $OUT/summary.json and a table on stdout.
# All phases take at most 16 minutes: split them over device calls (each at most 10 minutes; trl reads the
# model directory the bench phase wrote, so they go together):
#   run(command="bash benchmarks/gpu.sh checks train", carry=[".whl"], timeout_s=420)
#   run(command="bash benchmarks/gpu.sh bench trl", carry=[".whl"], timeout_s=600)
#
# --dry-run: the same phases and steps on the CPU (DS_ACCELERATOR=cpu, gloo, one rank, the tiny demo model,
# llama-tiny-8k at 64 tokens for the benchmarks): proves the plumbing before a GPU runs it
# (tests/test_gpu_sh.py). It uses the calling Python ($PYTHON) as it is; nothing is installed. Every budget is
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
PHASES=("$@"); (( ${#PHASES[@]} )) || PHASES=(checks train bench trl)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/dpo-ds-gpu-bench}; mkdir -p "$OUT"
RES=$OUT/results.jsonl; LOG=$OUT/log.txt; : > "$RES"; : > "$LOG"
WORK=$OUT/work; STEPS_DIR=$OUT/steps; mkdir -p "$WORK" "$STEPS_DIR"  # steps/NAME.log: one step's output
T0=$(date +%s)
export TOKENIZERS_PARALLELISM=false

SCALE=${BUDGET_SCALE:-$(( DRY ? 4 : 1 ))}
if (( DRY )); then
  export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
  NGPU=1; PRECISION=fp32; MODEL=benchmarks/configs/llama-tiny-8k; LEN=64; MBS=1; WARMUP=1; STEPS=1
  LOGNORMAL=lognormal:48,0.5; TORCH_ADAMW=ds_configs/zero3_cpu.json; TRAIN_STEPS=2
else
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
    || echo "wheel install failed" | tee -a "$LOG"
  export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
  # NCCL allows one rank per GPU: 2 ranks with two GPUs, else 1
  NGPU=$("$PYTHON" -c "import torch; print(max(1, min(torch.cuda.device_count(), 2)))" 2>> "$LOG" || echo 1)
  PRECISION=bf16; MODEL=llama-1b; LEN=2048; MBS=4; WARMUP=2; STEPS=4; LOGNORMAL=lognormal:1024,0.6
  TORCH_ADAMW=ds_configs/zero3.json; TRAIN_STEPS=4
fi
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
bench() {  # name, extra args: the step's line carries dpo-ds bench's JSON result
  local name=$1; shift
  step "$name" 70 "$PYTHON" -m dpo_ds bench --model "$MODEL" --lengths "fixed:$LEN" --max_length "$LEN" \
      --precision "$PRECISION" --micro_batch_size "$MBS" --warmup "$WARMUP" --steps "$STEPS" --json \
      --output_dir "$WORK/bench_$name" "$@"
}

D=$WORK/demo
run_checks() {
  phase checks 90
  step launcher.dist 45 "${TORCHRUN[@]}" -m launcher.dist
  step gpu_checks 45 "${TORCHRUN[@]}" benchmarks/gpu_checks.py
}
run_train() {
  phase train 300
  "$PYTHON" -c "from dpo_ds.demo_data import build_demo_assets; build_demo_assets('$D', n_train=128, n_heldout=16)" \
      >> "$LOG" 2>&1
  local train=(-m dpo_ds train --model_name_or_path "$D/model" --train_file "$D/train.jsonl" --eval_file
               "$D/heldout.jsonl" --max_length 64 --micro_batch_size 4 --max_steps "$TRAIN_STEPS" --save_steps 2 --logging_steps 1
               --precision "$PRECISION")
  step train_live_ref 90 "${TORCHRUN[@]}" "${train[@]}" --output_dir "$WORK/train"
  step train_precompute_ref_padding_free 90 "${TORCHRUN[@]}" "${train[@]}" --output_dir "$WORK/train_pf" \
      --precompute_ref true --padding_free true
  # QLoRA: the packed nf4 weights ZeRO-3 sharded, final/ merged into the original base (needs bitsandbytes)
  if "$PYTHON" -c "import bitsandbytes" >> "$LOG" 2>&1; then
    step train_qlora_nf4 60 "${TORCHRUN[@]}" "${train[@]}" --output_dir "$WORK/qlora" --lora_r 8 \
        --lora_quantize nf4 --max_steps 1 --save_steps 1
  else
    skip train_qlora_nf4 "bitsandbytes not installed"
  fi
  step convert 45 "$PYTHON" -m dpo_ds convert "$WORK/train/checkpoints/$(printf 'step-%08d' "$TRAIN_STEPS")" "$WORK/convert"
  step eval 45 "$PYTHON" -m dpo_ds eval --model "$WORK/convert" --data "$D/heldout.jsonl" --output "$WORK/eval.jsonl" \
      --precision "$PRECISION"
}
run_bench() {
  local one
  for one in live_ref_offload precompute_ref logits_path lora_r16 lognormal_padding_free adamw_torch_fused \
             adamw_deepspeed_fused; do
    phase "bench_$one" 70
    case $one in
      live_ref_offload) bench dpo-ds_live_ref_offload --ref_offload true ;;
      precompute_ref) bench dpo-ds_precompute_ref --precompute_ref true ;;
      logits_path) bench dpo-ds_logits_path+precompute_ref --precompute_ref true --fused_lm_head false ;;
      lora_r16) bench dpo-ds_lora_r16 --lora_r 16 ;;
      lognormal_padding_free) bench dpo-ds_lognormal_padding_free+precompute_ref --lengths "$LOGNORMAL" \
          --max_length $(( LEN * 2 )) --padding_free true --precompute_ref true ;;
      adamw_torch_fused) bench adamw_torch_fused --precompute_ref true --deepspeed_config "$TORCH_ADAMW" ;;
      adamw_deepspeed_fused)  # compiles a CUDA op: only where nvcc can build it (dpo-ds checks before loading),
        # with its own extensions folder, so a build the step limit kills leaves no lock another step waits on
        if (( DRY )); then
          skip adamw_deepspeed_fused "dry run: FusedAdam compiles an op"
        elif command -v nvcc > /dev/null; then
          TORCH_EXTENSIONS_DIR=$WORK/fused_adam_extensions \
            bench adamw_deepspeed_fused --precompute_ref true --deepspeed_config ds_configs/zero3_fused_adam.json
        else
          skip adamw_deepspeed_fused "no nvcc"
        fi ;;
    esac
  done
}
run_trl() {
  phase trl 100
  if ! "$PYTHON" -c "import trl" >> "$LOG" 2>&1; then skip trl "trl not installed"; return; fi
  local model_dir
  model_dir=$(find "$WORK/bench_dpo-ds_precompute_ref/bench_model" -mindepth 1 -maxdepth 1 -type d 2> /dev/null | head -n 1)
  if [[ -z $model_dir ]]; then skip trl "no bench model directory (run the bench phase first)"; return; fi
  "$PYTHON" benchmarks/make_pairs.py --lengths "fixed:$LEN" --max_length "$LEN" --micro_batch_size "$MBS" \
      --warmup "$WARMUP" --steps "$STEPS" --out "$WORK/pairs.json" >> "$LOG" 2>&1
  step trl 100 "$PYTHON" benchmarks/trl_dpo.py --model_dir "$model_dir" --pairs "$WORK/pairs.json" \
      --precision "$PRECISION" --max_length "$LEN"
}

for name in "${PHASES[@]}"; do
  case $name in
    checks) run_checks ;; train) run_train ;; bench) run_bench ;; trl) run_trl ;;
    *) echo "gpu.sh: unknown phase '$name' (checks, train, bench, trl)" >&2; exit 2 ;;
  esac
done
"$PYTHON" benchmarks/gpu_summary.py "$OUT" | tee -a "$LOG"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
