"""The model a plan is for: its parameters counted on the model itself, built on the meta device (no memory, no
weights), so every causal LM transformers has is covered; its widths read from its config.

Published shapes come as presets; any config.json or model directory works too (nothing is downloaded).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dpo_ds.families import load_model_config


def _llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, max_pos: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos)


def _mixtral_8x7b():
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768)


# Published shapes: the Hugging Face configs of Llama-2 7B/13B/70B, Llama-3 8B and Mixtral-8x7B.
PRESETS = {
    # small shapes for benchmarks: ~60M parameters (CPU) and a TinyLlama-1.1B shape (one GPU)
    "llama-60m": lambda: _llama(32000, 512, 1408, 8, 8, 8, 8192),
    "llama-1b": lambda: _llama(32000, 2048, 5632, 22, 32, 4, 8192),
    "llama-7b": lambda: _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-13b": lambda: _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama-70b": lambda: _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    "llama3-8b": lambda: _llama(128256, 4096, 14336, 32, 32, 8, 8192),
    "mixtral-8x7b": _mixtral_8x7b,
}

# bitsandbytes nf4 (QLoRA): two weights per byte; double-quantized constants: an 8-bit absmax per 64-weight block
# and an fp32 scale per 256 absmax.
NF4_BYTES = 0.5
NF4_CONSTANT_BYTES = 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: parameter counts (from the built model) and widths (from its config)."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_width: int            # intermediate size of the MLP a token passes through: the dense MLP's, or one expert's
    num_experts: int          # 1 for a dense MLP
    experts_per_token: int
    params: int               # N: every parameter once (tied embeddings once)
    active_params: int        # what one token passes through: an MoE token visits experts_per_token of the experts
    largest_module_params: int  # DeepSpeed's largest_layer_params: parameters one module owns directly
    linear_weight_params: int   # weights of every Linear but the output layer: what QLoRA quantizes to nf4
    linear_in_out: int          # sum of in + out features of every Linear (and GPT-2 Conv1D) but the output layer
    fused_head: bool            # the trainer scores inside lm_head (dpo_ds.scoring.fused_head) for this model

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:  # grouped-query attention: K and V have num_kv_heads heads
        return self.num_kv_heads * self.head_dim

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank r on every linear layer but the output layer (peft's all-linear):
        r x (in + out) per module. In transformers >= 5 an MoE layer's experts are fused parameters, not Linear
        modules: only its attention (and any dense layer) gets adapters."""
        return r * self.linear_in_out

    def quantized_base_bytes(self, dtype_bytes: int) -> tuple[float, float]:
        """QLoRA's nf4 base: (parameter bytes, quantization-constant bytes). bitsandbytes packs two 4-bit weights
        per byte; the rest of the base (embeddings, norms, lm_head, MoE experts) keeps dtype_bytes. The constants
        are not parameters: with double quantization one 8-bit absmax per 64-weight block and one fp32 per 256
        absmax (NF4_CONSTANT_BYTES per quantized weight)."""
        quantized = self.linear_weight_params
        return (NF4_BYTES * quantized + dtype_bytes * (self.params - quantized), NF4_CONSTANT_BYTES * quantized)

    def layer_activation_bytes_per_token(self, dtype_bytes: int) -> int:
        """Tensors one decoder layer saves for backward, per token (recomputed under checkpointing).

        why each term: each RMSNorm upcasts its input to fp32 and saves it plus its output (2 norms);
        attention saves q and k before and after RoPE, v, and its output (the o_proj input), and the
        residual sum feeds the next norm; the SwiGLU MLP saves gate, up, silu(gate) and their product
        (the down_proj input), for each of the experts_per_token experts a token is routed to, and an
        MoE layer also keeps the token copies it dispatches to them. Other layer designs (GPT-2's MLP, extra
        norms) keep fewer or about as many tensors: this is the budget for all.
        """
        h, k = self.hidden_size, self.experts_per_token
        norms = 2 * (4 + dtype_bytes) * h
        attention = dtype_bytes * (3 * self.q_dim + 3 * self.kv_dim + h)
        mlp = dtype_bytes * k * (4 * self.mlp_width + (h if self.num_experts > 1 else 0))
        return norms + attention + mlp


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shape_from_config(config, name: str) -> ModelShape:
    """Count the parameters of the model `config` describes on the meta device; read its widths from the config."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from dpo_ds.families import unsupported_reason
    from dpo_ds.scoring import fused_head

    why = unsupported_reason(config, trust_remote_code=False)
    if why:
        raise SystemExit(f"dpo-ds plan: {name!r} is a {config.model_type} model, which dpo-ds cannot train: {why}")
    model = _meta_model(config)
    text = config.get_text_config()
    head = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())
    experts = (getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
               or getattr(text, "n_routed_experts", None) or 1)
    per_token = getattr(text, "num_experts_per_tok", 1) if experts > 1 else 1
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    linear = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    heads = text.num_attention_heads
    dense_width = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size
    return ModelShape(
        name=name,
        model_type=config.model_type,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        mlp_width=(getattr(text, "moe_intermediate_size", None) or dense_width) if experts > 1 else dense_width,
        num_experts=experts,
        experts_per_token=per_token,
        params=params,
        active_params=params - expert_params * (experts - per_token) // experts,
        largest_module_params=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        linear_weight_params=sum(m.weight.numel() for m in linear if isinstance(m, torch.nn.Linear)),
        linear_in_out=sum(sum(m.weight.shape) for m in linear),
        fused_head=fused_head(model) is not None,
    )


def model_config_and_name(model: str):
    """(transformers config, name) of a preset, or of the model whose config.json (or directory) is given."""
    if not os.path.exists(model):
        if model not in PRESETS:
            raise SystemExit(f"dpo-ds: unknown model {model!r}: not a config.json or model directory, "
                             f"nor a preset ({', '.join(PRESETS)})")
        return PRESETS[model](), model
    try:
        config = load_model_config(model)
    except (OSError, ValueError) as err:
        raise SystemExit(f"dpo-ds: cannot read a model config from {model!r}: {err}") from err
    directory = os.path.dirname(model) if os.path.isfile(model) else model
    return config, os.path.basename(os.path.abspath(directory))


def load_shape(model: str) -> ModelShape:
    """The shape of a preset, or of the model whose config.json (or directory holding one) is given."""
    return shape_from_config(*model_config_and_name(model))
