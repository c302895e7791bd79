"""The run configuration: one typed dataclass, loaded from YAML with `--field value` overrides.

Every field's YAML key is also its command-line flag. Values are checked here, before any model or data
is touched, and a bad value is reported with the file, line and field it came from (`errors`). The paths a run
reads are checked by `paths`, what the device supports by `devices`; `reference` writes docs/configuration.md
(`python -m dpo_ds.config --markdown`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dpo_ds.config.devices import expected_accelerator, resolve_precision
from dpo_ds.config.errors import ConfigError
from dpo_ds.config.paths import check_paths
from dpo_ds.losses import (ALIASES, LOSS_TYPES, PARAMS, check_objective, parse_loss_type, parse_loss_weights,
                           uses_reference)


def _field(default: Any, help: str, group: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "group": group, "metavar": metavar})


def _loss_field(name: str) -> Any:
    """A loss parameter's field: default and help from its declaration beside the losses (losses.PARAMS)."""
    return _field(PARAMS[name].default, PARAMS[name].help, "loss")


# Choice fields: the Literal is the type, its values the allowed ones (checked by `coerce`, listed by --help).
LrScheduler = Literal["constant", "linear", "cosine"]
Precision = Literal["auto", "bf16", "fp32"]
WeightsLoader = Literal["streamed", "transformers"]
LoraQuantize = Literal["nf4"]
ZeroStage = Literal["auto", "0", "1", "2", "3"]
AutoBool = Literal["auto", "true", "false"]  # a switch dpo-ds sets itself by default (the log says which and why)
AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


@dataclass
class TrainConfig:
    # --- model
    model_name_or_path: Optional[str] = _field(None, "Policy: a Hugging Face model directory, or a hub id (the local cache first; checked before anything loads).", "model")
    ref_model_name_or_path: Optional[str] = _field(None, "Frozen reference model; default: the policy's starting weights.", "model")
    trust_remote_code: bool = _field(False, "Allow model/tokenizer code shipped with the checkpoint to run. Off: only code in transformers runs.", "model")
    disable_dropout: bool = _field(True, "Turn dropout off in the policy and the reference (dropout modules and the config's dropout values the model reads while running; exports keep the config's values). With dropout on, the two models disagree before any update and the DPO signal is noise, so only turn it off for a reason.", "model")
    # --- LoRA (peft): base weights frozen, adapters trained; the reference is the base with the adapter off
    lora_r: int = _field(0, "LoRA rank: 0 = full fine-tuning; > 0 trains rank-r adapters on lora_target_modules of the frozen base, and the reference is the same engine with the adapter off (no second model).", "lora")
    lora_alpha: float = _field(16.0, "LoRA scaling numerator: the adapter adds B A x * lora_alpha / lora_r.", "lora")
    lora_dropout: float = _field(0.0, "Dropout on the adapter's input (the policy forward only; the reference runs without it).", "lora")
    lora_target_modules: str = _field("all-linear", "Modules that get adapters: all-linear (every Linear but the output layer) or a comma-separated list of module names (e.g. q_proj,v_proj; a YAML list works too).", "lora")
    lora_adapter: Optional[str] = _field(None, "A PEFT LoRA adapter directory to start from (e.g. the SFT stage's); its r, alpha, dropout and target modules are used, the lora_* fields above are ignored, and the reference is base + this adapter (a frozen copy). Turns LoRA on.", "lora")
    lora_quantize: Optional[LoraQuantize] = _field(None, "QLoRA: quantize the frozen base to nf4 (bitsandbytes 4-bit NormalFloat, double-quantized; needs the qlora extra and a device bitsandbytes supports: CUDA GPUs, CPU, XPU, HPU). Every Linear but the output layer is quantized; ZeRO-3 shards the packed weights. final/ merges the adapter into the original base weights from model_name_or_path (a local safetensors directory), not the dequantized nf4 ones.", "lora")
    # --- data
    train_file: Optional[str] = _field(None, "Preference pairs: JSONL, Parquet, or a `datasets.save_to_disk` directory.", "data")
    eval_file: Optional[str] = _field(None, "Held-out pairs in the same formats, scored every `eval_steps` and at the end.", "data")
    max_length: int = _field(1024, "Maximum tokens of prompt + completion; longer completions are cut at the end.", "data")
    max_prompt_length: Optional[int] = _field(None, "Keep only the last N prompt tokens (default: prompts are not cut; a pair whose prompt leaves no room for a completion token is dropped and counted).", "data")
    skip_bad_rows: bool = _field(False, "Skip and count invalid rows instead of stopping with an error that names file, line and field.", "data")
    shuffle: bool = _field(True, "Shuffle pairs each epoch (seeded). Off + group_by_length off: step k uses pairs [k*G, (k+1)*G) in file order.", "data")
    group_by_length: bool = _field(False, "Put pairs of similar length in the same micro-batch (less padding); micro-batches are shuffled.", "data")
    max_tokens_per_micro_batch: Optional[int] = _field(None, "Token budget per micro-batch: pairs of similar length are packed while 2 x pairs x longest sequence fits (at least one pair), so micro-batches carry similar token counts; micro_batch_size is then only the grouping window unit. Every pair keeps equal weight in the loss.", "data")
    prepare_workers: int = _field(0, "Processes that tokenize when the prepared-pairs cache is built (by `dpo-ds prepare`, or by rank 0 of `train` when the cache is missing); 0 = one per CPU core available. Does not change the token ids.", "data")
    padding_free: AutoBool = _field("auto", "Pack each micro-batch's 2B sequences into one row without padding (position ids restart per sequence), each sequence attended alone: flash attention's varlen kernel, or sdpa called once per sequence (attention sdpa_packed, which attn_implementation auto switches sdpa models to); with attn_implementation sdpa, eager or flex_attention, through a block-diagonal mask over the row, quadratic in its total tokens. auto: on for the tested model families (README) where each sequence is attended alone (attention sdpa with no sliding window shorter than max_length and no soft-capped scores, or flash attention) and sequence_parallel_size is 1, else off. The log says which and why.", "data")
    # --- loss
    loss_type: str = _field("sigmoid", f"Preference loss, or a list of losses (YAML list or comma-separated) whose weighted sum is minimised (loss_weights), each logged as loss/<name>: {', '.join(LOSS_TYPES)} ({', '.join(f'{a} = {n}' for a, n in ALIASES.items())}). Formulas and when to use each: docs/training.md.", "loss", metavar="NAME[,NAME...]")
    loss_weights: Optional[str] = _field(None, "One weight per loss of loss_type (YAML list or comma-separated), e.g. MPO's [0.8, 0.2, 1.0] for [sigmoid, bco_pair, sft]; default 1 each.", "loss", metavar="W[,W...]")
    beta: float = _loss_field("beta")
    label_smoothing: float = _loss_field("label_smoothing")
    simpo_gamma: float = _loss_field("simpo_gamma")
    discopop_tau: float = _loss_field("discopop_tau")
    rpo_alpha: float = _loss_field("rpo_alpha")
    reference_free: bool = _field(False, "Treat log pi_ref as 0 (no reference model is built).", "loss")
    length_normalize: bool = _loss_field("length_normalize")
    ld_alpha: Optional[float] = _loss_field("ld_alpha")
    use_weighting: bool = _loss_field("use_weighting")
    desirable_weight: float = _loss_field("desirable_weight")
    undesirable_weight: float = _loss_field("undesirable_weight")
    router_aux_loss_coef: float = _field(0.0, "Mixture-of-experts models only: add this times the model's router load-balancing loss (transformers' output_router_logits) to the DPO loss, as TRL does; logged as aux_loss. 0 = off.", "loss")
    # --- drift and stability guards
    max_kl: Optional[float] = _field(None, "Warn when the mean per-token log pi - log pi_ref over completions (a logging window) exceeds this.", "guards")
    stop_on_max_kl: bool = _field(False, "Stop (after saving a checkpoint) instead of only warning when max_kl is exceeded.", "guards")
    max_bad_steps: int = _field(3, "Stop after this many consecutive optimizer steps skipped for NaN/Inf loss or gradients.", "guards")
    # --- optimisation
    learning_rate: float = _field(1e-6, "Peak learning rate (AdamW).", "optim")
    lr_scheduler: LrScheduler = _field("linear", "Learning-rate schedule after warm-up: constant, linear (to 0) or cosine (to 0).", "optim")
    warmup_steps: int = _field(0, "Optimizer steps of linear warm-up from 0 to learning_rate.", "optim")
    weight_decay: float = _field(0.0, "AdamW weight decay (not applied to 1-D parameters: norms and biases).", "optim")
    adam_beta1: float = _field(0.9, "AdamW beta1.", "optim")
    adam_beta2: float = _field(0.999, "AdamW beta2.", "optim")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon.", "optim")
    max_grad_norm: float = _field(1.0, "Clip the global gradient norm to this (0 = no clipping).", "optim")
    micro_batch_size: int = _field(1, "Pairs per rank per micro-step (the forward batch is 2x this: chosen ; rejected).", "optim")
    gradient_accumulation_steps: int = _field(1, "Micro-steps per optimizer step.", "optim")
    max_steps: int = _field(0, "Optimizer steps to run; 0 = num_epochs passes over the data.", "optim")
    num_epochs: int = _field(1, "Passes over the training pairs when max_steps is 0.", "optim")
    seed: int = _field(42, "Seed for data order and any randomness in the step.", "optim")
    # --- engine
    precision: Precision = _field("auto", "bf16 (mixed precision) or fp32; auto: bf16 where the device supports it (a CUDA GPU with bf16), fp32 on CPU. run_config.json records the resolved value.", "engine")
    gradient_checkpointing: AutoBool = _field("auto", "Recompute each layer's activations in the backward pass (non-reentrant) instead of keeping them: a third forward pass (about a fifth of a step with a live reference) that saves all but one layer's activations. auto: on at ZeRO stage 3; below it (the whole model on every rank) off when dpo-ds plan's memory model says a step's activations fit without it (the same budget as zero_stage auto), for a dense model with sdpa or flash attention (eager attention's saved scores and MoE routing copies are not fully counted), else on. The log says which and why.", "engine")
    zero_stage: ZeroStage = _field("auto", "DeepSpeed ZeRO stage of the policy engine: 0 (every rank holds the whole model, gradients all-reduced), 1 (optimizer state partitioned), 2 (gradients too) or 3 (parameters too: the model never whole on one rank). auto: the lowest stage whose per-rank memory (dpo-ds plan's memory model: weights, gradients, optimizer state, a live reference's weights, activations) fits what a rank may fill less dpo-ds plan's headroom (its GPU's memory; on CPU the host's memory or its cgroup's limit, shared by the node's ranks), else 3; LoRA, QLoRA and sequence-parallel runs keep 3. The log says which stage and why. Below 3 the reference is an unpartitioned inference engine (ref_offload applies to a ZeRO-3 reference only). A deepspeed_config that sets zero_optimization.stage decides instead of auto.", "engine")
    ref_offload: bool = _field(True, "Keep the reference model's ZeRO-3 parameters on CPU (`offload_param: cpu`).", "engine")
    deepspeed_config: Optional[str] = _field(None, "Policy DeepSpeed JSON (see ds_configs/). Values it leaves out or sets to \"auto\" are filled from this config; default: ds_configs/zero3.json on GPU, ds_configs/zero3_cpu.json on CPU.", "engine")
    ref_deepspeed_config: Optional[str] = _field(None, "Reference DeepSpeed JSON; default ds_configs/reference_zero3.json.", "engine")
    weights_loader: WeightsLoader = _field("streamed", "How ZeRO-3 ranks read a local safetensors model: streamed (rank 0 reads each rank's slice of each tensor and scatters it chunk by chunk: no rank holds more than its partition plus a chunk) or transformers (from_pretrained under HfDeepSpeedConfig: rank 0 maps the whole checkpoint). Other formats always use transformers.", "engine")
    attn_implementation: AttnImplementation = _field("auto", "Attention kernel transformers builds the models with: eager, sdpa, flash_attention_2, flash_attention_3 or flex_attention. auto: flash_attention_2 when padding_free is on with bf16 on a GPU and the flash_attn package is installed (varlen: each packed sequence costs what it would alone); otherwise the model's own default (sdpa for most), and under padding_free a model whose default is sdpa switches to sdpa_packed (sdpa called once per packed sequence, no mask) unless a sliding window shorter than max_length needs transformers' block-diagonal mask. Asked for by name (sdpa, eager, flex_attention), a kernel attends a packed row through that mask, quadratic in the micro-batch's total tokens.", "engine")
    sequence_parallel_size: int = _field(1, "Sequence parallelism (DeepSpeed's Ulysses): S consecutive ranks share every sequence, each running the model on 1/S of its tokens (attention exchanges heads by all-to-all); data parallel = world size / S. S must divide the world size and the model's attention heads, attn_implementation sdpa or flash_attention_2/3 (auto picks sdpa where it would pick the model's default). 1 = off. How to pick S: docs/training.md, Long context.", "engine")
    tiled_mlp: bool = _field(False, "Compute each dense MLP block in sequence tiles (DeepSpeed's TiledMLP; the backward recomputes one tile at a time), so the [tokens, intermediate] activations of the longest sequences exist one tile at a time. Same results; costs one more MLP forward per tile. For long context, with or without sequence_parallel_size; MoE expert blocks are left as they are.", "engine")
    precompute_ref: bool = _field(False, "Compute the reference log-probs of the train and eval pairs once before training (cached on disk under caches/, reused by later runs); training then runs no reference model.", "engine")
    fused_lm_head: bool = _field(True, "Compute completion-token log-probs inside the output projection, chunk by chunk and only at completion positions, so the [tokens, vocab] logits and their gradient never exist whole. Used where the model returns lm_head(hidden) unchanged (Llama, Mistral, Mixtral, Qwen2/3, Phi-3, Gemma, ...); other models (logit soft-capping or scaling) score from the full logits.", "engine")
    logprob_chunk_size: int = _field(256, "Sequence positions per chunk when turning hidden states or logits into token log-probs (bounds the fp32 block to chunk x vocab).", "engine")
    dist_timeout_s: float = _field(600.0, "Seconds a rank waits for the others at the rendezvous and in every collective before failing with a message; phases where rank 0 works alone (data preparation, universal conversion, checkpoint publishing, the final export) wait without this limit.", "engine")
    # --- outputs and monitoring
    output_dir: str = _field("runs/dpo", "Run folder: metrics.jsonl, tensorboard/, caches/, checkpoints/, final/. Must be the same directory on every node (a shared file system); checked at start.", "output")
    cache_dir: Optional[str] = _field(None, "Where prepared (tokenized) pairs and precomputed reference log-probs are cached, by fingerprint (default <output_dir>/caches); `dpo-ds prepare` fills it ahead of training; point runs at one directory to share them. Must be the same directory on every node; checked at start.", "output")
    logging_steps: int = _field(10, "Log metrics every N optimizer steps.", "output")
    eval_steps: int = _field(0, "Evaluate on eval_file every N optimizer steps (0 = only at the end).", "output")
    save_steps: int = _field(0, "Save a resumable checkpoint every N optimizer steps (0 = only the final export; SIGTERM/SIGUSR1 always checkpoint).", "output")
    save_total_limit: int = _field(0, "Keep only the newest N checkpoints (0 = keep all).", "output")
    resume_from: Optional[str] = _field(None, "`auto` (the latest checkpoint in output_dir; start fresh when there is none) or a checkpoint directory.", "output")
    overwrite: bool = _field(False, "Start in an output_dir that holds a run's outputs (final/, final_adapter/, run_config.json, metrics.jsonl, tensorboard/, checkpoints/), replacing them (logged by name); with resume_from, continue a finished run and export it again. Without it such a start is refused, and `resume_from: auto` on a finished run reports it finished and exits 0.", "output")
    resume_ignore_mismatch: bool = _field(False, "Resume even when the model, data fingerprint or a run-defining field differs from the checkpoint's.", "output")

    def global_batch_pairs(self, world_size: int) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class FieldType:
    """What a field's annotation says: the Python type of its values, whether None is allowed, and the allowed
    values of a Literal field (empty for the others)."""
    kind: type
    optional: bool
    choices: tuple[str, ...]


def _field_type(hint: Any) -> FieldType:
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return FieldType(str, optional, typing.get_args(hint))
    return FieldType(hint, optional, ())


FIELD_TYPES = {name: _field_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items()}


# Fields holding a list, stored as one comma-separated string (run_config.json and resume checks compare strings).
_LIST_FIELDS = {"loss_type": parse_loss_type, "loss_weights": parse_loss_weights}


_BOOL_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError('...') without location."""
    kind, optional, choices = dataclasses.astuple(FIELD_TYPES[name])
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"field '{name}': a value is required")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_TEXT:
            return _BOOL_TEXT[value.lower()]
        raise ConfigError(f"field '{name}': expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"field '{name}': expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"field '{name}': expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"field '{name}': expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"field '{name}': expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"field '{name}': expected a finite number, got {value!r}")
        return number
    if name in _LIST_FIELDS:
        try:
            return _LIST_FIELDS[name](value)
        except ValueError as err:
            raise ConfigError(f"field '{name}': {err}") from None
    if name == "zero_stage" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # YAML `zero_stage: 2`
    if choices == typing.get_args(AutoBool) and (isinstance(value, bool) or str(value).lower() in _BOOL_TEXT):
        value = "true" if _BOOL_TEXT[str(value).lower()] else "false"  # YAML `true`, --padding_free yes
    if name == "lora_target_modules" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # a YAML list of module names
    if not isinstance(value, str):
        raise ConfigError(f"field '{name}': expected a string, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"field '{name}': {value!r} is not one of {', '.join(choices)}")
    return value


def _yaml_fields(path: Path) -> dict[str, tuple[Any, int]]:
    """Top-level mapping of a YAML file as {key: (value, line number)}."""
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: expected a mapping of field: value")
    out: dict[str, tuple[Any, int]] = {}
    constructor = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        if key_node.value in out:
            raise ConfigError(f"{path}:{line}: field '{key_node.value}' is set twice (first at line {out[key_node.value][1]})")
        out[key_node.value] = (constructor.construct_object(value_node, deep=True), line)
    return out


def load_config(path: str | None, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """`defaults`, then the YAML file (optional), then command-line overrides -> resolved, validated TrainConfig."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # field -> where its value was set, for errors found by validate()
    for key, value in (defaults or {}).items():
        values[key] = coerce(key, value)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        for key, (value, line) in _yaml_fields(p).items():
            if key not in FIELDS:
                raise ConfigError(f"{path}:{line}: unknown field '{key}'{_suggest(key)}")
            try:
                values[key] = coerce(key, value)
            except ConfigError as err:
                raise ConfigError(f"{path}:{line}: {err}") from None
            origin[key] = f"{path}:{line}"
    for key, value in (overrides or {}).items():
        try:
            values[key] = coerce(key, value)
        except ConfigError as err:
            raise ConfigError(f"command line --{key}: {err}") from None
        origin[key] = f"command line --{key}"
    cfg = TrainConfig(**values)
    cfg.precision = resolve_precision(cfg.precision)
    try:
        validate(cfg)
    except ConfigError as err:
        if err.field_name in origin:
            raise ConfigError(f"{origin[err.field_name]}: {err}", err.field_name) from None
        raise
    return cfg


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that must fail before any model is loaded."""
    def bad(field_name: str, why: str) -> None:
        raise ConfigError(f"field '{field_name}': {why}", field_name)

    if cfg.model_name_or_path is None:
        bad("model_name_or_path", "required")
    if cfg.train_file is None:
        bad("train_file", "required")
    for name in ("max_length", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "logprob_chunk_size",
                 "max_bad_steps", "sequence_parallel_size"):
        if getattr(cfg, name) < 1:
            bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.prepare_workers < 0:
        bad("prepare_workers", f"must be >= 0 (0: one per core), got {cfg.prepare_workers}")
    if cfg.logging_steps == 0:
        bad("logging_steps", "must be >= 1")
    if cfg.max_tokens_per_micro_batch is not None and cfg.max_tokens_per_micro_batch < 2:
        bad("max_tokens_per_micro_batch", f"must be >= 2, got {cfg.max_tokens_per_micro_batch}")
    if cfg.max_prompt_length is not None and not 1 <= cfg.max_prompt_length < cfg.max_length:
        bad("max_prompt_length", f"must be in [1, max_length={cfg.max_length}), got {cfg.max_prompt_length}")
    if cfg.max_kl is not None and cfg.max_kl <= 0:
        bad("max_kl", f"must be > 0, got {cfg.max_kl}")
    if cfg.stop_on_max_kl and cfg.max_kl is None:
        bad("stop_on_max_kl", "needs max_kl")
    objective_problem = check_objective(cfg)
    if objective_problem:
        bad(*objective_problem)
    if cfg.learning_rate < 0 or cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        bad("learning_rate" if cfg.learning_rate < 0 else "weight_decay" if cfg.weight_decay < 0 else "max_grad_norm", "must be >= 0")
    if cfg.router_aux_loss_coef < 0:
        bad("router_aux_loss_coef", f"must be >= 0, got {cfg.router_aux_loss_coef}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad(name, f"must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.dist_timeout_s <= 0:
        bad("dist_timeout_s", f"must be > 0, got {cfg.dist_timeout_s}")
    if cfg.precompute_ref and cfg.ld_alpha is not None:
        bad("ld_alpha", "precompute_ref caches plain sums of the reference log-probs; LD-DPO needs them weighted "
                        "per pair: remove ld_alpha or precompute_ref")
    if cfg.precompute_ref and not uses_reference(cfg):
        bad("precompute_ref", f"loss_type {cfg.loss_type}{' with reference_free' if cfg.reference_free else ''} uses no reference model")
    if cfg.reference_free and cfg.ref_model_name_or_path is not None:
        bad("ref_model_name_or_path", "reference_free uses no reference model; remove the path")
    if not cfg.reference_free and not uses_reference(cfg) and cfg.ref_model_name_or_path is not None:
        bad("ref_model_name_or_path", f"loss_type {cfg.loss_type} uses no reference model; remove the path")
    flash_package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(cfg.attn_implementation)
    if flash_package and importlib.util.find_spec(flash_package) is None:
        bad("attn_implementation", f"{cfg.attn_implementation} needs the {flash_package} package, which is not installed")
    _validate_lora(cfg, bad)


def uses_lora(cfg: TrainConfig) -> bool:
    return cfg.lora_r > 0 or cfg.lora_adapter is not None


def _validate_lora(cfg: TrainConfig, bad) -> None:
    if cfg.lora_r < 0:
        bad("lora_r", f"must be >= 0 (0 = full fine-tuning), got {cfg.lora_r}")
    if cfg.lora_alpha <= 0:
        bad("lora_alpha", f"must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        bad("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    if not [m for m in cfg.lora_target_modules.split(",") if m.strip()]:
        bad("lora_target_modules", "names no module; use all-linear or a comma-separated list of module names")
    if cfg.lora_adapter is not None:
        config_file = Path(cfg.lora_adapter) / "adapter_config.json"
        if not config_file.is_file():
            bad("lora_adapter", f"{config_file} not found: expected a PEFT adapter directory (adapter_config.json + "
                                f"adapter_model.safetensors)")
        try:
            peft_type = json.loads(config_file.read_text()).get("peft_type")
        except json.JSONDecodeError as err:
            bad("lora_adapter", f"{config_file}:{err.lineno}: invalid JSON: {err.msg}")
        if peft_type != "LORA":
            bad("lora_adapter", f"{config_file}: peft_type is {peft_type!r}; only LoRA adapters (LORA) are supported")
    if not uses_lora(cfg):
        if cfg.lora_quantize is not None:
            bad("lora_quantize", "quantizes the frozen base of a LoRA run; set lora_r (or lora_adapter) too")
        return
    if cfg.ref_model_name_or_path is not None:
        bad("ref_model_name_or_path", "with LoRA the reference is the policy's own frozen base (with the starting "
                                      "adapter when lora_adapter is set), computed in the same engine with the "
                                      "trained adapter switched off, so no separate reference model is loaded; "
                                      "remove the path, or set lora_r 0 (and no lora_adapter) for full fine-tuning "
                                      "against another reference")
    if cfg.lora_quantize == "nf4":
        _validate_qlora(cfg, bad)


# DeepSpeed accelerators (DS_ACCELERATOR names) on which bitsandbytes quantizes to nf4 and runs 4-bit Linear layers
QLORA_DEVICES = ("cuda", "cpu", "xpu", "hpu")


def _validate_qlora(cfg: TrainConfig, bad) -> None:
    device = expected_accelerator()
    if device not in QLORA_DEVICES:
        bad("lora_quantize", f"nf4 needs bitsandbytes kernels for the device, and bitsandbytes has none for {device} "
                             f"(it supports {', '.join(QLORA_DEVICES)}); remove lora_quantize to train LoRA on the "
                             f"unquantized base")
    elif importlib.util.find_spec("bitsandbytes") is None:
        bad("lora_quantize", "nf4 needs the bitsandbytes package, which is not installed (pip install 'dpo-ds[qlora]')")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` plus one `--field` flag per config field, grouped, with the field's help text."""
    parser.add_argument("--config", help="YAML file of config fields (flags below override it).")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group_name = f.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(f"{group_name} fields"))
        kind, _, choices = dataclasses.astuple(FIELD_TYPES[f.name])
        metavar = (f.metadata["metavar"] or ("{" + ",".join(choices) + "}" if choices else
                                             {bool: "BOOL", int: "INT", float: "FLOAT"}.get(kind, "STR")))
        group.add_argument(f"--{f.name}", metavar=metavar, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {f.default})")


def config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None,
                     fixed: dict[str, Any] | None = None, unchecked_paths: tuple[str, ...] = ()) -> TrainConfig:
    """The one way every command builds its config: `defaults` (a command's own, e.g. `eval`'s loss settings of
    the run that trained the model), then the YAML file of `--config`, then the `--field` flags given (None:
    not given), then the values the command sets itself (`fixed`); resolved (precision auto), validated, and
    every path the run reads checked (check_paths), but for the fields in `unchecked_paths`."""
    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    overrides.update(fixed or {})
    cfg = load_config(getattr(args, "config", None), overrides, defaults)
    check_paths(cfg, skip=unchecked_paths)
    return cfg



def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
