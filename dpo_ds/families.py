"""Model families: the ones every change is tested with, the check that refuses a model dpo-ds cannot
train before anything is loaded, and the one reader of a model's config.json (`load_model_config`).

SUPPORTED_FAMILIES is the list tests/test_families.py trains (2-rank ZeRO-3 against plain PyTorch DPO,
export and `dpo-ds convert` against save_pretrained, reload) and README.md lists; a test keeps the two
equal. Other causal LMs of transformers load through the same code (transformers' own layout conversions,
no per-family code here) but are not in that matrix.
"""
from __future__ import annotations

import logging

from dpo_ds.config import ConfigError, TrainConfig, uses_reference

logger = logging.getLogger("dpo_ds")

# model_type -> the name users know; what makes each worth testing
SUPPORTED_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",                  # attention biases
    "qwen3": "Qwen3",                  # q/k norms
    "qwen3_moe": "Qwen3-MoE",          # fused experts in memory, per-expert tensors on disk
    "mixtral": "Mixtral",              # the same, plus renamed blocks (block_sparse_moe)
    "gemma2": "Gemma-2",               # logit soft-capping, tied embeddings
    "gemma3_text": "Gemma-3 (text)",   # tied embeddings, sliding-window layers
    "gpt2": "GPT-2",                   # Conv1D, dropout 0.1 in its config, tied embeddings
    "phi3": "Phi-3",                   # fused qkv / gate_up projections
    "olmo2": "OLMo-2",                 # norms after attention and MLP
}


def load_model_config(path: str, trust_remote_code: bool = False):
    """The transformers config of the model directory (or config.json, or hub id) `path`."""
    from transformers import AutoConfig  # heavy: `--help` of the commands importing this module stays fast

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_model_family(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the model type and why, for a policy or reference dpo-ds cannot train; only
    config.json is read."""
    paths = [("model_name_or_path", cfg.model_name_or_path)]
    if cfg.ref_model_name_or_path and uses_reference(cfg):
        paths.append(("ref_model_name_or_path", cfg.ref_model_name_or_path))
    for field_name, path in paths:
        config = load_model_config(path, cfg.trust_remote_code)
        why = unsupported_reason(config, cfg.trust_remote_code)
        if why:
            raise ConfigError(f"field '{field_name}': {path} is a {config.model_type} model, which dpo-ds cannot "
                              f"train: {why}", field_name)
        if cfg.router_aux_loss_coef > 0 and not hasattr(config.get_text_config(), "output_router_logits"):
            raise ConfigError(f"field 'router_aux_loss_coef': {path} is a {config.model_type} model, which has no "
                              f"router (no output_router_logits in its config); set router_aux_loss_coef to 0",
                              "router_aux_loss_coef")
        if config.model_type not in SUPPORTED_FAMILIES:
            logger.warning("%s: model type %s is not among the families dpo-ds is tested with (%s)", path,
                           config.model_type, ", ".join(SUPPORTED_FAMILIES.values()))


def unsupported_reason(config, trust_remote_code: bool) -> str | None:
    """Why a model of `config` cannot be trained with DPO here, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        return ("it is an encoder-decoder model; DPO here scores completions with a decoder-only causal LM "
                "(one forward over prompt + completion)")
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "transformers has no causal language-model class (AutoModelForCausalLM) for it"
    return None
