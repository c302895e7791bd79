"""The DeepSpeed configs of the engines: a preset from ds_configs/ (or the run's own JSON) with every "auto" or
missing value filled from the run config, checked before any engine is built."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dpo_ds.compiled_ops import check_compiled_ops
from dpo_ds.config import ConfigError, TrainConfig, uses_lora
from dpo_ds.engines.accelerator import on_cpu
from dpo_ds.engines.sizing import zero_stage_choice

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "ds_configs"


def default_config_path(kind: str) -> Path:
    name = {"policy": "zero3_cpu.json" if on_cpu() else "zero3.json", "reference": "reference_zero3.json"}[kind]
    path = DS_CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"default DeepSpeed preset {path} not found; pass deepspeed_config / ref_deepspeed_config")
    return path


def _load_json(path: str | Path, field_name: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"field '{field_name}': {path} not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (field '{field_name}')") from None


def _fill(section: dict, key: str, value: Any) -> None:
    """Set `key` when it is missing or "auto"; an explicit value in the JSON wins."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def _check_no_auto(node: Any, path: str, source: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_auto(v, f"{path}.{k}" if path else k, source)
    elif node == "auto":
        raise ConfigError(f"{source}: '{path}' is \"auto\" but dpo-ds has no value for it; set it explicitly")


def resolve_policy_config(cfg: TrainConfig, world_size: int, hidden_size: int) -> dict[str, Any]:
    """The policy's DeepSpeed config with every "auto" (or missing) value filled from the run config."""
    source = cfg.deepspeed_config or default_config_path("policy")
    ds = copy.deepcopy(_load_json(source, "deepspeed_config"))
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps)
    _fill(ds, "train_batch_size", cfg.global_batch_pairs(world_size))
    _fill(ds, "gradient_clipping", cfg.max_grad_norm)
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", cfg.precision == "bf16")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", cfg.learning_rate)
    _fill(params, "betas", [cfg.adam_beta1, cfg.adam_beta2])
    _fill(params, "eps", cfg.adam_epsilon)
    _fill(params, "weight_decay", cfg.weight_decay)
    fill_zero_buckets(ds, hidden_size, "deepspeed_config")
    set_sequence_parallel_size(ds, cfg)
    _fill_policy_stage(ds["zero_optimization"], cfg, world_size, source)
    _check_no_auto(ds, "", str(source))
    check_compiled_ops(ds, str(source), on_gpu=not on_cpu())
    return ds


def policy_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """The policy's ZeRO stage: a deepspeed_config's explicit zero_optimization.stage, else the zero_stage field's."""
    source = cfg.deepspeed_config or default_config_path("policy")
    zero = dict(_load_json(source, "deepspeed_config").get("zero_optimization") or {})
    _fill_policy_stage(zero, cfg, world_size, source)
    return zero["stage"]


def _fill_policy_stage(zero: dict, cfg: TrainConfig, world_size: int, source: str | Path) -> None:
    stage = zero.get("stage", "auto")
    if stage == "auto":
        zero["stage"] = zero_stage_choice(cfg, world_size).stage
    elif stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2, 3 or \"auto\", got {stage!r}")
    elif cfg.zero_stage not in ("auto", str(stage)):
        raise ConfigError(f"field 'zero_stage': {cfg.zero_stage} but {source} sets zero_optimization.stage {stage}; "
                          f"set one of them")
    if zero["stage"] < 3 and cfg.sequence_parallel_size > 1:  # auto never picks it (engines/sizing.py)
        raise ConfigError(f"field 'zero_stage': sequence_parallel_size {cfg.sequence_parallel_size} is built and "
                          f"tested on ZeRO stage 3 only (its gradient scaling is ZeRO-3's), got {zero['stage']}")
    if zero["stage"] < 3 and uses_lora(cfg):
        raise ConfigError(f"field 'zero_stage': LoRA and QLoRA runs need ZeRO stage 3, got {zero['stage']}")
    if zero["stage"] < 3 and zero.get("offload_param", {}).get("device", "none") != "none":
        raise ConfigError(f"{source}: offload_param needs ZeRO stage 3, the policy runs stage {zero['stage']}")


def resolve_reference_config(cfg: TrainConfig, hidden_size: int, policy_stage: int = 3) -> dict[str, Any]:
    """The reference engine's config: inference, no optimizer. Beside a ZeRO-3 policy it is partitioned too
    (ZeRO-3, parameters on CPU when ref_offload); beside a policy that holds the whole model on every rank
    (stages 0-2) it is whole too (stage 0): one copy of the weights, no per-module gathers."""
    source = cfg.ref_deepspeed_config or default_config_path("reference")
    ds = copy.deepcopy(_load_json(source, "ref_deepspeed_config"))
    if "optimizer" in ds:
        raise ConfigError(f"{source}: the reference engine must have no 'optimizer' block (it is never trained)")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", 1)
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed derives it from the two above and the world size
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", cfg.precision == "bf16")
    zero = ds.setdefault("zero_optimization", {"stage": "auto"})
    _fill(zero, "stage", 3 if policy_stage == 3 else 0)
    if zero["stage"] == 3:
        offload = zero.setdefault("offload_param", {"device": "auto"})
        _fill(offload, "device", "cpu" if cfg.ref_offload else "none")
        if on_cpu():
            offload["pin_memory"] = False  # no pinned memory without a GPU
    elif zero.get("offload_param", {}).get("device") == "auto":
        del zero["offload_param"]  # ref_offload is the ZeRO-3 reference's
    fill_zero_buckets(ds, hidden_size, "ref_deepspeed_config")
    set_sequence_parallel_size(ds, cfg)
    _check_no_auto(ds, "", str(source))
    return ds


def set_sequence_parallel_size(ds: dict, cfg: TrainConfig) -> None:
    # DeepSpeed counts the data-parallel ranks (the batch-size check) as world / S: from the engine's mpu, and
    # from this key where a config is read without one (zero.Init while the model is built, HfDeepSpeedConfig)
    if cfg.sequence_parallel_size > 1:
        ds["sequence_parallel_size"] = cfg.sequence_parallel_size


def fill_zero_buckets(ds: dict, hidden_size: int, field_name: str) -> None:
    # Bucket sizes follow the model's width (the HF Trainer convention): one hidden x hidden matrix per bucket,
    # and parameters under 10 x hidden elements (norms, biases) stay unpartitioned.
    zero = ds.setdefault("zero_optimization", {"stage": "auto"})
    _fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)

