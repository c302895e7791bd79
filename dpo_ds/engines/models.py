"""The models the engines wrap: loaded ZeRO-3 partitioned, and prepared for the run (dropout off, expert blocks
as ZeRO-3 leaves) before DeepSpeed wraps them."""
from __future__ import annotations

import logging
from typing import Any

import torch

from dpo_ds import packed_attention
from dpo_ds.config import TrainConfig
from dpo_ds.families import SUPPORTED_FAMILIES, load_model_config
from dpo_ds.hf_dir import ConfigOverride
from dpo_ds.loading import load_sharded_pretrained
from dpo_ds.safetensors_io import has_safetensors
from dpo_ds.sequence_parallel import enable_tiled_mlp, ulysses_kernel

logger = logging.getLogger(__name__)


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def attention_kernel(cfg: TrainConfig) -> str | None:
    """The `attn_implementation` to build models with; None leaves the model's default (see the field's help).
    Under sequence parallelism never None: the Ulysses attention must know which kernel it wraps."""
    if not isinstance(cfg.padding_free, bool):  # "auto" would read as on
        raise ValueError("padding_free is settled (resolve_padding_free) before the attention kernel is chosen")
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if cfg.padding_free and _flash_varlen_available(cfg):
        return "flash_attention_2"
    return ulysses_kernel(None) if cfg.sequence_parallel_size > 1 else None


def _flash_varlen_available(cfg: TrainConfig) -> bool:
    """Whether flash attention's varlen kernel can attend the policy's packed rows: bf16 on a GPU, the flash_attn
    package, and a model class transformers runs with it."""
    from transformers.utils import is_flash_attn_2_available

    if not (cfg.precision == "bf16" and torch.cuda.is_available() and is_flash_attn_2_available()):
        return False
    model_class = _causal_lm_class(load_model_config(cfg.model_name_or_path, cfg.trust_remote_code))
    return bool(model_class and model_class._supports_flash_attn)


def resolve_padding_free(cfg: TrainConfig) -> None:
    """Set `cfg.padding_free` to the bool the run uses, once its model is known and before anything checks or
    builds with the attention kernel; auto's choice is logged with its reason."""
    setting = str(cfg.padding_free).lower()
    if setting != "auto":
        cfg.padding_free = setting == "true"
        return
    cfg.padding_free, why = _padding_free_auto(cfg)
    logger.info("padding_free %s (padding_free auto: %s)", "on" if cfg.padding_free else "off", why)


def _padding_free_auto(cfg: TrainConfig) -> tuple[bool, str]:
    """Packed rows where each packed sequence is attended alone (costing what it would in a row of its own), for
    the families dpo-ds tests (tests/test_families.py trains them with this default), from the policy's
    config.json and the attention kernel it will get (attention_kernel, packed_attention.adopt)."""
    if cfg.sequence_parallel_size > 1:
        return False, f"sequence_parallel_size {cfg.sequence_parallel_size} keeps padded rows"
    config = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code)
    if config.model_type not in SUPPORTED_FAMILIES:  # hybrid and recurrent layers mix a packed row's sequences
        return False, f"model type {config.model_type} is not among the families dpo-ds tests packed rows with"
    if cfg.attn_implementation in ("flash_attention_2", "flash_attention_3") or (
            cfg.attn_implementation == "auto" and _flash_varlen_available(cfg)):
        return True, "flash attention's varlen kernel attends each packed sequence alone"
    model_class = _causal_lm_class(config)
    kernel = "sdpa" if model_class and model_class._supports_sdpa else "eager"  # transformers' default
    why = packed_attention.mask_reason(cfg.attn_implementation, kernel, config.get_text_config(), cfg.max_length)
    if why is not None:
        return False, f"a packed row would go through a block-diagonal mask, quadratic in its total tokens ({why})"
    return True, f"sdpa attends each packed sequence alone (attention {packed_attention.KERNEL})"


def _causal_lm_class(config) -> type | None:
    """The class transformers builds `config`'s causal LM with; None for one it does not list (remote code)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def load_sharded_model(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                       weights_loader: str = "streamed", attn_implementation: str | None = None):
    """The model at `path`, ZeRO-3 partitioned as it is built, so no rank ever holds the whole model (below
    stage 3, whole: every rank loads it).

    `streamed` (local safetensors directories): dpo_ds.loading reads each rank's slice of each tensor on
    rank 0 and sends it, so a rank holds its partition plus one chunk. Otherwise (`transformers`, hub ids,
    .bin files): `from_pretrained` under HfDeepSpeedConfig, where rank 0 maps the whole checkpoint.
    """
    if ds_config["zero_optimization"]["stage"] < 3:  # every rank holds the whole model: plain loading
        return _load_with_transformers(path, ds_config, dtype, trust_remote_code, attn_implementation)
    if weights_loader == "streamed" and has_safetensors(path):
        return load_sharded_pretrained(path, ds_config, dtype, trust_remote_code, attn_implementation)
    return _load_with_transformers(path, ds_config, dtype, trust_remote_code, attn_implementation)


def _load_with_transformers(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                            attn_implementation: str | None):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay alive while from_pretrained runs
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation)
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()
    return model


def _is_dropout_rate(name: str, value: Any) -> bool:
    return ("dropout" in name or name.endswith("pdrop")) and isinstance(value, (int, float)) \
        and not isinstance(value, bool)


def disable_dropout(model: torch.nn.Module) -> list[ConfigOverride]:
    """Dropout off for good, whatever mode the model is in (the policy trains in train mode): every dropout
    module gets p = 0, and every dropout rate a module copied from its config or reads from it while running
    (attention_dropout, resid_pdrop, ...) becomes 0. Returns the config values changed, which exports undo
    (hf_dir.saved_config)."""
    from transformers import PretrainedConfig

    configs = [("", model.config)] + [(name, value) for name, value in vars(model.config).items()
                                      if isinstance(value, PretrainedConfig)]
    originals = []
    for sub_config, config in configs:
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value) and value != 0:
                originals.append((sub_config, name, value))
                setattr(config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    return originals


def mark_expert_blocks(model: torch.nn.Module) -> int:
    """Make every block that holds its experts as separate modules (an `experts` ModuleList) one ZeRO-3 leaf.

    Tokens reach only some experts, and ranks route differently: per-expert modules would be fetched and
    run on one rank and not on another, and ZeRO-3's prefetch and gradient reduction would hang. As a leaf,
    the block's parameters are gathered and reduced together on every rank. transformers' own MoE models keep
    experts fused in one module that always runs, so this only acts on models that do not."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.ModuleList)}
    if classes:
        set_z3_leaf_modules(model, list(classes))
    return len(classes)


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> list[ConfigOverride]:
    """What the run changes on a freshly loaded policy or reference model, before DeepSpeed wraps it; returns
    the config values it changed."""
    overrides = disable_dropout(model) if cfg.disable_dropout else []
    mark_expert_blocks(model)
    if packed_attention.adopt(model, cfg):
        logger.info("padding_free: each packed sequence attended alone (attention %s)", packed_attention.KERNEL)
    if cfg.tiled_mlp:
        logger.info("tiled_mlp: %d MLP blocks computed in sequence tiles", enable_tiled_mlp(model))
    return overrides

