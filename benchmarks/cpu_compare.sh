#!/bin/bash
# dpo-ds vs a plain-PyTorch DPO step vs TRL DPOTrainer: CPU, 1 process, llama-60m (58.5M params, 32k vocab) or
# MODEL, fp32, micro batch 4 pairs, identical synthetic pairs (dpo_ds.bench.synthetic_pairs, same sampler order).
# Runs one at a time; each process under /usr/bin/time -v (peak RSS, same method for all).
#   benchmarks/cpu_compare.sh [results_dir]
# env: MODEL (a preset or a config.json directory, e.g. benchmarks/configs/llama-small-160), LOGN, FIXED, MAXLEN,
#      MBS, WARMUP, STEPS, BUDGET, SKIP_FIXED=1, ROWS=<regex of row names>, PASSES=N (the rows N times, interleaved),
#      QUIET_IDLE=90 (start a run only when the machine is >= this % idle), QUIET_WAIT=300 (max wait, s)
set -u
cd "$(dirname "$0")/.."
R=${1:-benchmarks/results/cpu_compare}; mkdir -p "$R"; : > "$R/order.txt"; : > "$R/commands.txt"
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
PY=.venv/bin/python
LOGN=${LOGN:-lognormal:128,0.6}; FIXED=${FIXED:-fixed:128}; MAXLEN=${MAXLEN:-512}
MBS=${MBS:-4}; WARMUP=${WARMUP:-1}; STEPS=${STEPS:-3}; BUDGET=${BUDGET:-2048}
OUT=${BENCH_OUT:-/tmp/dpo-ds-bench}
MODEL=${MODEL:-llama-60m}
MODEL_DIR=$OUT/bench_model/$(basename "$MODEL")
benchmarks/setup_trl_venv.sh >/dev/null
TRL_PY=${TRL_VENV:-$HOME/.cache/dpo-ds-bench/venv-trl}/bin/python
VOCAB=$($PY -c "from dpo_ds.plan import model_config_and_name as m; print(m('$MODEL')[0].vocab_size)")

idle_pct() {  # % of CPU time idle over the next 2 s (whole machine)
  local a b; a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat))
  local idle=$(( b[4] + b[5] - a[4] - a[5] )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( 100 * idle / (total > 0 ? total : 1) ))
}
quiet() {  # wait (up to QUIET_WAIT s) until the shared VM is idle (other engineers' tests also use the 2 cores)
  local waited=0 idle
  while :; do
    idle=$(idle_pct); (( idle >= ${QUIET_IDLE:-90} || waited >= ${QUIET_WAIT:-300} )) && break; waited=$(( waited + 2 ))
  done
  echo "   machine idle ${idle}% before start (waited ${waited}s)" | tee -a "$R/commands.txt"
}
run() {  # name, command... (pass p > 1 of PASSES: name.p)
  local name=$1; shift
  if [[ -n ${ROWS:-} && ! $name =~ $ROWS ]]; then return; fi
  (( pass > 1 )) && name=$name.$pass
  quiet
  echo "$name" >> "$R/order.txt"
  echo "== $name: $*" | tee -a "$R/commands.txt"
  /usr/bin/time -v -o "$R/$name.time" "$@" > "$R/$name.json" 2> "$R/$name.log" || echo "   failed, see $R/$name.log"
  tail -n 1 "$R/$name.json"
}
dpods() {  # name, lengths, extra args
  local name=$1 lengths=$2; shift 2
  run "$name" $PY -m dpo_ds bench --model "$MODEL" --lengths "$lengths" --max_length "$MAXLEN" --precision fp32 \
      --micro_batch_size "$MBS" --warmup "$WARMUP" --steps "$STEPS" --json --output_dir "$OUT" "$@"
}
LIST="$LOGN"; [[ -z ${SKIP_FIXED:-} ]] && LIST="$LIST $FIXED"
for pass in $(seq 1 "${PASSES:-1}"); do
for lengths in $LIST; do
  tag=${lengths%%:*}
  dpods "dpo-ds_${tag}_default" "$lengths"
  [[ -d $MODEL_DIR ]] || { echo "no $MODEL_DIR (run the dpo-ds default row once)"; exit 1; }
  [[ -f $R/pairs_$tag.json ]] || $PY benchmarks/make_pairs.py --lengths "$lengths" --max_length "$MAXLEN" \
      --micro_batch_size "$MBS" --warmup "$WARMUP" --steps "$STEPS" --vocab_size "$VOCAB" --out "$R/pairs_$tag.json" \
      >> "$R/commands.txt"
  run "plain_${tag}" $PY benchmarks/plain_dpo.py --model_dir "$MODEL_DIR" --pairs "$R/pairs_$tag.json"
  run "trl_${tag}" "$TRL_PY" benchmarks/trl_dpo.py --model_dir "$MODEL_DIR" --pairs "$R/pairs_$tag.json" --max_length "$MAXLEN"
  dpods "dpo-ds_${tag}_padded" "$lengths" --padding_free false  # the defaults before padding_free auto
  # the defaults before auto sizing: ZeRO-3, the recompute, padded rows
  dpods "dpo-ds_${tag}_zero3_recompute" "$lengths" --zero_stage 3 --gradient_checkpointing true --padding_free false
  if [[ $tag == lognormal ]]; then
    dpods "dpo-ds_${tag}_logits_path" "$lengths" --fused_lm_head false
    dpods "dpo-ds_${tag}_group_by_length" "$lengths" --group_by_length true --padding_free false
    dpods "dpo-ds_${tag}_token_budget${BUDGET}" "$lengths" --group_by_length true --max_tokens_per_micro_batch "$BUDGET" \
        --padding_free false
    dpods "dpo-ds_${tag}_packed_mask" "$lengths" --padding_free true --attn_implementation sdpa  # block-diagonal mask
    dpods "dpo-ds_${tag}_precompute_ref" "$lengths" --precompute_ref true
  fi
  dpods "dpo-ds_${tag}_padding_free+precompute_ref" "$lengths" --padding_free true --precompute_ref true
done
done
$PY benchmarks/summarize.py "$R" | tee "$R/summary.md"
