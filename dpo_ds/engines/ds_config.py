"""The DeepSpeed configs of the engines: a preset from ds_configs/ (or the run's own JSON) with every "auto" or
missing value filled from the run config, checked before any engine is built."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from deepspeed.accelerator import get_accelerator

from dpo_ds.compiled_ops import check_compiled_ops
from dpo_ds.config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "ds_configs"


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


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
    if ds["zero_optimization"].get("stage") != 3:
        raise ConfigError(f"{source}: zero_optimization.stage must be 3 for the policy")
    _check_no_auto(ds, "", str(source))
    check_compiled_ops(ds, str(source), on_gpu=not on_cpu())
    return ds


def resolve_reference_config(cfg: TrainConfig, hidden_size: int) -> dict[str, Any]:
    """The reference engine's config: ZeRO-3 inference, no optimizer, parameters on CPU when ref_offload."""
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
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    offload = zero.setdefault("offload_param", {"device": "auto"})
    _fill(offload, "device", "cpu" if cfg.ref_offload else "none")
    if on_cpu():
        offload["pin_memory"] = False  # no pinned memory without a GPU
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
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    _fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)

