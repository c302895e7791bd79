#!/bin/bash
# GPU checks and benchmark (prepared, not yet run: it awaits a session that is lent a GPU). One H100, < 9 minutes.
# First the checks of issue 16 (NCCL, no per-micro-step syncs, pinned memory, a short training run + convert +
# eval, each a {"run": ..., "exit": ...} line) and issue 12's one-step QLoRA run, then the benchmarks:
# llama-1b preset (1.1B params, 32k vocab), 2k tokens per sequence, bf16, ZeRO-3, micro batch 4 pairs:
#   dpo-ds: live reference (ZeRO-3, offloaded to CPU) | --precompute_ref true | the same with --fused_lm_head false
#   (full logits) | --lora_r 16 | log-normal lengths with --padding_free true --precompute_ref true
#   TRL DPOTrainer on the same random-init model and the same pairs (bf16 autocast, gradient checkpointing)
# JSON lines -> $OUT/results.jsonl, everything else -> $OUT/log.txt.
#
# Before calling the device tool, on the CPU machine, in the repo root:
#   grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
#   ../shared/device-wheels.sh --with-trl          # deepspeed + small deps + trl/datasets for Python 3.12
#   python3 -m pip download -q --no-deps -d .whl bitsandbytes==0.50.2   # QLoRA step (43 MB: mind carry's 64 MiB)
# then: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=580)
set -u
OUT=${OUT:-/tmp/dpo-ds-gpu-bench}; mkdir -p "$OUT"
RES=$OUT/results.jsonl; LOG=$OUT/log.txt; : > "$RES"; : > "$LOG"
T0=$(date +%s); DEADLINE=${DEADLINE_S:-480}   # stop starting new runs after this many seconds
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || echo "wheel install failed" | tee -a "$LOG"
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=/tmp/torch_extensions TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" >> "$LOG" 2>&1
# DeepSpeed's FusedAdam is compiled at first use and needs nvcc; without it use torch's AdamW (same math).
DSCFG=(); command -v nvcc >/dev/null || DSCFG=(--deepspeed_config benchmarks/configs/zero3_torch_adam.json)
echo "nvcc: $(command -v nvcc || echo none) -> ${DSCFG[*]:-project default ds config}" >> "$LOG"

# ---- issue 16 first: the real GPU paths, before any benchmark. NCCL with `python -m launcher.dist`, the NCCL
# helpers / no device sync per micro-step / pinned-memory release (benchmarks/gpu_checks.py), then a short
# training run on every GPU (2 processes with two GPUs, else 1: NCCL allows one rank per GPU) with checkpoints,
# eval pairs and the final export, a precompute_ref + padding_free run, `dpo-ds convert` and `dpo-ds eval`.
NGPU=$(python3 -c "import torch; print(max(1, min(torch.cuda.device_count(), 2)))" 2>> "$LOG" || echo 1)
TORCHRUN=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPU")
step() {  # name, command...: its exit status and time as one line of results.jsonl
  local name=$1; shift
  echo "== $name: $*" >> "$LOG"
  local t0; t0=$(date +%s)
  timeout 150 "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "{\"run\": \"$name\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" | tee -a "$RES"
}
step launcher.dist "${TORCHRUN[@]}" -m launcher.dist
step gpu_checks "${TORCHRUN[@]}" benchmarks/gpu_checks.py
grep '^{"check"' "$LOG" >> "$RES"
D=/tmp/gpu_demo
python3 -c "from dpo_ds.demo_data import build_demo_assets; build_demo_assets('$D', n_train=128, n_heldout=16)" >> "$LOG" 2>&1
TRAIN=(-m dpo_ds train --model_name_or_path $D/model --train_file $D/train.jsonl --eval_file $D/heldout.jsonl
       --max_length 64 --micro_batch_size 4 --max_steps 4 --save_steps 2 --logging_steps 1 --precision bf16 "${DSCFG[@]}")
step train_live_ref "${TORCHRUN[@]}" "${TRAIN[@]}" --output_dir /tmp/gpu_train
step train_precompute_ref_padding_free "${TORCHRUN[@]}" "${TRAIN[@]}" --output_dir /tmp/gpu_train_pf --precompute_ref true \
    --padding_free true
# QLoRA on the GPU path (bf16: the packed nf4 weights stored as bf16, ZeRO-3 sharded): one step with a checkpoint
# and the final export (final/ merged into the original base, final_adapter/). Needs bitsandbytes in .whl (see top).
if python3 -c "import bitsandbytes" >> "$LOG" 2>&1; then
  step train_qlora_nf4 "${TORCHRUN[@]}" "${TRAIN[@]}" --output_dir /tmp/gpu_qlora --lora_r 8 --lora_quantize nf4 \
      --max_steps 1 --save_steps 1
else
  echo '{"run": "train_qlora_nf4", "skipped": "bitsandbytes not installed"}' | tee -a "$RES"
fi
step convert python3 -m dpo_ds convert /tmp/gpu_train/checkpoints/step-00000004 /tmp/gpu_convert
step eval python3 -m dpo_ds eval --model /tmp/gpu_convert --data $D/heldout.jsonl --output /tmp/gpu_eval.jsonl \
    --precision bf16
tail -n 2 /tmp/gpu_train/metrics.jsonl >> "$LOG" 2>&1

GB=/tmp/gb; MODEL=llama-1b; LEN=2048; MBS=4; WARMUP=2; STEPS=4
bench() {  # name, extra args
  local name=$1; shift
  local budget; budget=$(left)
  if (( budget < 45 )); then echo "{\"run\": \"$name\", \"skipped\": \"time budget\"}" >> "$RES"; return; fi
  local cmd=(python3 -m dpo_ds bench --model $MODEL --lengths fixed:$LEN --max_length $LEN --precision bf16
             --micro_batch_size $MBS --warmup $WARMUP --steps $STEPS --json --output_dir $GB "${DSCFG[@]}" "$@")
  echo "== $name: ${cmd[*]}" >> "$LOG"
  local line
  line=$(timeout $(( budget < 150 ? budget : 150 )) "${cmd[@]}" 2>> "$LOG" | tail -n 1)
  if [[ $line == \{* ]]; then echo "{\"run\": \"$name\", \"command\": \"${cmd[*]}\", \"result\": $line}" >> "$RES"
  else echo "{\"run\": \"$name\", \"failed\": true}" >> "$RES"; fi
  tail -n 1 "$RES"
}
bench dpo-ds_live_ref_offload --ref_offload true
bench dpo-ds_precompute_ref --precompute_ref true
bench dpo-ds_logits_path+precompute_ref --precompute_ref true --fused_lm_head false
# LoRA r 16 on all linear layers: the reference is the same engine with the adapter off (needs peft in .whl)
bench dpo-ds_lora_r16 --lora_r 16
# log-normal lengths (mean ~1k): padding-free packing (sdpa's block-diagonal mask unless flash-attn is installed)
bench dpo-ds_lognormal_padding_free+precompute_ref --lengths lognormal:1024,0.6 --max_length 4096 \
    --padding_free true --precompute_ref true

# TRL on the same model directory and the same pairs (step order of dpo-ds bench).
budget=$(left)
if (( budget >= 60 )) && [[ -d $GB/bench_model/$MODEL ]]; then
  python3 benchmarks/make_pairs.py --lengths fixed:$LEN --max_length $LEN --micro_batch_size $MBS --warmup $WARMUP \
      --steps $STEPS --out /tmp/pairs_gpu.json >> "$LOG" 2>&1
  echo "== trl: python3 benchmarks/trl_dpo.py --model_dir $GB/bench_model/$MODEL --pairs /tmp/pairs_gpu.json --precision bf16 --max_length $LEN" >> "$LOG"
  line=$(timeout $(( budget < 180 ? budget : 180 )) python3 benchmarks/trl_dpo.py --model_dir $GB/bench_model/$MODEL \
      --pairs /tmp/pairs_gpu.json --precision bf16 --max_length $LEN 2>> "$LOG" | tail -n 1)
  if [[ $line == \{* ]]; then echo "{\"run\": \"trl\", \"result\": $line}" >> "$RES"; else echo '{"run": "trl", "failed": true}' >> "$RES"; fi
  tail -n 1 "$RES"
else
  echo '{"run": "trl", "skipped": "time budget or no model dir"}' >> "$RES"
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
