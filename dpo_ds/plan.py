"""`dpo-ds plan`: will a DPO run fit, and what does one micro-step cost?

Everything here is arithmetic on the model's shape (no weights, no GPU). The memory model follows
DeepSpeed ZeRO-3 as implemented in `deepspeed/runtime/zero/stage3.py` (0.19.x) with its default
bucket sizes, Hugging Face gradient checkpointing (one checkpoint per decoder layer) and
flash/SDPA attention (no seq x seq score matrix is stored).

Units: bytes internally; reports in GiB (2**30). `--gpu_memory_gb` / `--cpu_memory_gb` are read
as GiB too (an "80 GB" H100 reports ~79.6 GiB; the headroom absorbs the difference).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from dpo_ds.console import emit
from dpo_ds.config import FIELDS
from dpo_ds.families import load_model_config

HELP = """Estimate per-GPU and per-node memory and the FLOPs of one DPO micro-step on DeepSpeed ZeRO-3,
from a model's config alone (a preset name, a config.json, or a model directory; nothing is downloaded).
Counts the policy's ZeRO-3 model states (bf16 params and grads, fp32 master weights and Adam moments,
sharded over all GPUs or offloaded to CPU), the ZeRO-3 gather/bucket buffers, the frozen reference model
(on GPU, offloaded to CPU, or precomputed), gradient-checkpointed activations and the log-probs (inside
lm_head, or from full logits); --lora_r R budgets LoRA instead: the frozen base as a sharded bf16 shard,
grads and optimizer states for the adapter only, no reference model (the base with the adapter off), and with
--lora_quantize nf4 QLoRA: the base's Linear weights at 0.5 byte/param (sharded) plus their absmax constants. It says
whether that fits in GPU memory and CPU memory per node, keeping 10% of each as headroom; and searches for a
setting that fits, on the given machines first (optimizer offload, then parameter offload, then halving the
micro batch down to 1), then on 2, 4, ... times the nodes up to --max_nodes, and prints the `dpo-ds train`
flags and ds_configs preset of the answer. The reference defaults to train's: offloaded to CPU.
Example: dpo-ds plan --model llama-70b --nodes 4 --gpus_per_node 8 --seq_len 4096 --reference offload"""

GIB = 2**30
# Kept free on every GPU and on every node's host: the CUDA context, NCCL buffers, allocator
# fragmentation; the OS, page cache and data loaders on the host.
HEADROOM = 0.10
# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py), in elements.
# bitsandbytes nf4 (QLoRA): two weights per byte; double-quantized constants: an 8-bit absmax per 64-weight block
# and an fp32 scale per 256 absmax.
NF4_BYTES = 0.5
NF4_CONSTANT_BYTES = 1 / 64 + 4 / (64 * 256)
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size: params gathered ahead of use
REDUCE_BUCKET = 500_000_000  # reduce_bucket_size: the contiguous gradient bucket, allocated once
SUB_GROUP = 1_000_000_000  # sub_group_size: the optimizer steps the local shard this many elements at a time
# Tokens per chunk of the fp32 log-softmax over the vocabulary (the log-probs are computed chunk by chunk).
LOGPROB_CHUNK = FIELDS["logprob_chunk_size"].default  # the trainer's default chunk (sequence positions)
DEFAULT_CPU_MEMORY_GB = 2048  # DGX H100 / DGX A100-80GB hosts: 2 TB per node of 8 GPUs
NODE_COUNTS_CAP = 64
REFERENCE_MODES = ("gpu", "offload", "precomputed", "none")


# --------------------------------------------------------------------------------------------- model
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
SUPPORTED_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder, enough to count its parameters and activations."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of a dense MLP; an MoE model's experts have expert_intermediate_size
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int  # 1 for a dense MLP
    experts_per_token: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: an RMSNorm over head_dim on queries and on keys
    tied_embeddings: bool
    expert_intermediate_size: int = 0  # MLP width of one expert (Mixtral: intermediate_size; Qwen3-MoE: its own)

    @property
    def mlp_width(self) -> int:
        """Intermediate size of the MLP a token passes through: the dense MLP's, or one expert's."""
        return self.expert_intermediate_size or self.intermediate_size if self.num_experts > 1 else self.intermediate_size

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:  # grouped-query attention: K and V have num_kv_heads heads
        return self.num_kv_heads * self.head_dim

    @property
    def _module_sizes(self) -> dict[str, int]:
        """Parameters of each nn.Module that owns some directly (ZeRO-3 gathers one such module at a time)."""
        h, i = self.hidden_size, self.mlp_width
        sizes = {
            "embed_tokens": self.vocab_size * h,
            "q_proj": h * self.q_dim + self.qkv_bias * self.q_dim,
            "k_proj": h * self.kv_dim + self.qkv_bias * self.kv_dim,
            "v_proj": h * self.kv_dim + self.qkv_bias * self.kv_dim,
            "o_proj": self.q_dim * h + self.o_bias * h,
            "q_norm": self.qk_norm * self.head_dim,
            "k_norm": self.qk_norm * self.head_dim,
            "input_layernorm": h,
            "post_attention_layernorm": h,
        }
        if self.num_experts == 1:
            sizes |= {"gate_proj": h * i + self.mlp_bias * i, "up_proj": h * i + self.mlp_bias * i,
                      "down_proj": i * h + self.mlp_bias * h}
        else:  # transformers >= 5 fuses all experts into one module: gate_up_proj [E,2i,h] + down_proj [E,h,i]
            sizes |= {"experts": self.num_experts * 3 * h * i, "router": self.num_experts * h}
        return sizes

    @property
    def layer_params(self) -> int:
        return sum(v for k, v in self._module_sizes.items() if k != "embed_tokens")

    @property
    def params(self) -> int:
        """N: embeddings + layers + final norm + lm_head unless tied to the embeddings."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return embeddings + self.num_layers * self.layer_params + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: an MoE token visits experts_per_token of the experts
        (a dense model has num_experts = experts_per_token = 1)."""
        unused = (self.num_experts - self.experts_per_token) * 3 * self.hidden_size * self.mlp_width
        return self.params - self.num_layers * unused

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank r on every Linear but lm_head (peft's all-linear): r x (in + out)
        per module. In transformers >= 5 an MoE layer's experts and router are not Linear modules: only its
        attention gets adapters."""
        h, i = self.hidden_size, self.intermediate_size
        linear = [h + self.q_dim, h + self.kv_dim, h + self.kv_dim, self.q_dim + h]
        linear += [h + i, h + i, i + h] if self.num_experts == 1 else []
        return r * sum(linear) * self.num_layers

    @property
    def linear_weight_params(self) -> int:
        """Weights of every Linear but lm_head (what QLoRA quantizes to nf4): in x out per module; MoE experts and
        routers (fused parameters in transformers >= 5, not Linear) stay unquantized."""
        h, i = self.hidden_size, self.intermediate_size
        linear = [h * self.q_dim, h * self.kv_dim, h * self.kv_dim, self.q_dim * h]
        linear += [h * i, h * i, i * h] if self.num_experts == 1 else []
        return sum(linear) * self.num_layers

    def quantized_base_bytes(self, dtype_bytes: int) -> tuple[float, float]:
        """QLoRA's nf4 base: (parameter bytes, quantization-constant bytes). bitsandbytes packs two 4-bit weights
        per byte; the rest of the base (embeddings, norms, lm_head, MoE experts) keeps dtype_bytes. The constants
        are not parameters: with double quantization one 8-bit absmax per 64-weight block and one fp32 per 256
        absmax (NF4_CONSTANT_BYTES per quantized weight)."""
        quantized = self.linear_weight_params
        return (NF4_BYTES * quantized + dtype_bytes * (self.params - quantized), NF4_CONSTANT_BYTES * quantized)

    @property
    def largest_module_params(self) -> int:
        """What DeepSpeed's estimator calls largest_layer_params (`model_to_params`: params per module)."""
        return max(self._module_sizes.values())

    def layer_activation_bytes_per_token(self, dtype_bytes: int) -> int:
        """Tensors one decoder layer saves for backward, per token (recomputed under checkpointing).

        why each term: each RMSNorm upcasts its input to fp32 and saves it plus its output (2 norms);
        attention saves q and k before and after RoPE, v, and its output (the o_proj input), and the
        residual sum feeds the next norm; the SwiGLU MLP saves gate, up, silu(gate) and their product
        (the down_proj input), for each of the experts_per_token experts a token is routed to, and an
        MoE layer also keeps the token copies it dispatches to them.
        """
        h, k = self.hidden_size, self.experts_per_token
        norms = 2 * (4 + dtype_bytes) * h
        attention = dtype_bytes * (3 * self.q_dim + 3 * self.kv_dim + h)
        mlp = dtype_bytes * k * (4 * self.mlp_width + (h if self.num_experts > 1 else 0))
        return norms + attention + mlp


def shape_from_config(config, name: str) -> ModelShape:
    if config.model_type not in SUPPORTED_TYPES:
        raise SystemExit(f"dpo-ds plan: model_type {config.model_type!r} of {name!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1  # Mixtral / Qwen3-MoE
    dense_layers = [i for i in range(config.num_hidden_layers) if experts > 1 and (
        i in (getattr(config, "mlp_only_layers", None) or []) or (i + 1) % getattr(config, "decoder_sparse_step", 1))]
    if dense_layers:
        raise SystemExit(f"dpo-ds plan: {name!r} mixes dense MLP layers {dense_layers[:8]} with MoE layers, which "
                         f"the plan does not model (every layer of the same kind)")
    return ModelShape(
        name=name,
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        num_experts=experts,
        experts_per_token=getattr(config, "num_experts_per_tok", 1) if experts > 1 else 1,
        qkv_bias=config.model_type == "qwen2" or attention_bias,  # Qwen2 always has q/k/v biases
        o_bias=attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=config.model_type in ("qwen3", "qwen3_moe"),
        tied_embeddings=bool(config.tie_word_embeddings),
        expert_intermediate_size=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
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


# -------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Setup:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    cpu_memory_gb: float
    seq_len: int
    micro_batch_size: int  # preference pairs per GPU per micro-step
    precision: str = "bf16"
    reference: str = "gpu"
    offload_optimizer: bool = False
    offload_params: bool = False
    fused_lm_head: bool = True  # the trainer's default; every supported model type returns lm_head's output as is
    lora_r: int = 0  # > 0: LoRA adapters of this rank on all-linear, base frozen; the reference is the base itself
    lora_quantize: str | None = None  # "nf4" (with lora_r): QLoRA, the frozen base's Linear weights in 4 bits

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens_per_gpu(self) -> int:  # each pair is a chosen and a rejected sequence, padded to seq_len
        return 2 * self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class Item:
    """One memory consumer: bytes on each GPU and bytes of host memory per node."""

    name: str
    gpu_bytes: float
    cpu_bytes_per_node: float


@dataclass(frozen=True)
class Flops:
    tokens: int  # all GPUs, one micro-step
    dense: float
    attention: float

    @property
    def total(self) -> float:
        return self.dense + self.attention


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    setup: Setup
    items: tuple[Item, ...]
    flops: Flops

    @property
    def gpu_bytes(self) -> float:
        return sum(item.gpu_bytes for item in self.items)

    @property
    def cpu_bytes_per_node(self) -> float:
        return sum(item.cpu_bytes_per_node for item in self.items)

    @property
    def gpu_budget_bytes(self) -> float:
        return (1 - HEADROOM) * self.setup.gpu_memory_gb * GIB

    @property
    def cpu_budget_bytes(self) -> float:
        return (1 - HEADROOM) * self.setup.cpu_memory_gb * GIB

    @property
    def load_gpu_bytes(self) -> float:
        """QLoRA: each rank holds the whole nf4 base on its GPU from loading until deepspeed.initialize partitions
        it (before any optimizer state or activation exists). 0 otherwise (the base is partitioned as it loads)."""
        if not self.setup.lora_quantize:
            return 0.0
        return sum(self.model.quantized_base_bytes(self.setup.dtype_bytes))

    @property
    def fits_gpu(self) -> bool:
        return max(self.gpu_bytes, self.load_gpu_bytes) <= self.gpu_budget_bytes

    @property
    def fits_cpu(self) -> bool:
        return self.cpu_bytes_per_node <= self.cpu_budget_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def item(self, name: str) -> Item:
        return next(item for item in self.items if item.name == name)

    @property
    def policy_states(self) -> Item:
        """The policy's model states as DeepSpeed's estimator scopes them (with the gathered largest module)."""
        states = [item for item in self.items if item.name in MODEL_STATES]
        return Item("policy model states", sum(i.gpu_bytes for i in states),
                    sum(i.cpu_bytes_per_node for i in states))

    def to_dict(self) -> dict:
        def gib(nbytes: float) -> float:
            return round(nbytes / GIB, 3)

        gpn = self.setup.gpus_per_node
        return {
            "model": {**dataclasses.asdict(self.model), "params": self.model.params,
                      "active_params": self.model.active_params,
                      "largest_module_params": self.model.largest_module_params},
            "setup": {**dataclasses.asdict(self.setup), "total_gpus": self.setup.total_gpus},
            "lora_params": self.model.lora_params(self.setup.lora_r),
            "memory_gib": {item.name: {"per_gpu": gib(item.gpu_bytes), "gpu_per_node": gib(item.gpu_bytes * gpn),
                                       "cpu_per_node": gib(item.cpu_bytes_per_node)} for item in self.items},
            "policy_model_states_gib": {"per_gpu": gib(self.policy_states.gpu_bytes),
                                        "gpu_per_node": gib(self.policy_states.gpu_bytes * gpn),
                                        "cpu_per_node": gib(self.policy_states.cpu_bytes_per_node)},
            "gpu_gib_per_gpu": gib(self.gpu_bytes),
            "load_gpu_gib_per_gpu": gib(self.load_gpu_bytes),
            "gpu_gib_per_node": gib(self.gpu_bytes * gpn),
            "cpu_gib_per_node": gib(self.cpu_bytes_per_node),
            "gpu_budget_gib": gib(self.gpu_budget_bytes),
            "cpu_budget_gib": gib(self.cpu_budget_bytes),
            "headroom": HEADROOM,
            "fits_gpu": self.fits_gpu,
            "fits_cpu": self.fits_cpu,
            "fits": self.fits,
            "flops": {"tokens": self.flops.tokens, "dense": self.flops.dense, "attention": self.flops.attention,
                      "total": self.flops.total, "per_gpu": self.flops.total / self.setup.total_gpus},
        }


POLICY_PARAMS = "policy params"
POLICY_GRADS = "policy grads"
POLICY_OPTIMIZER = "policy fp32 master + Adam m, v"
POLICY_FP32_GRADS = "policy fp32 grads (optimizer step)"
ZERO3_GATHERED = "ZeRO-3 gathered module (params + grads)"
ZERO3_BUCKETS = "ZeRO-3 prefetch + reduce buckets"
NF4_CONSTANTS = "nf4 quantization constants (every GPU)"
MODEL_STATES = (POLICY_PARAMS, POLICY_GRADS, POLICY_OPTIMIZER, POLICY_FP32_GRADS, ZERO3_GATHERED)


def plan(model: ModelShape, setup: Setup) -> Plan:
    p = setup.dtype_bytes
    gpn = setup.gpus_per_node
    # Each rank owns 1/G of every parameter (ZeRO-3 partitioning; DeepSpeed's alignment padding is negligible).
    shard = model.params / setup.total_gpus
    largest = model.largest_module_params

    def placed(name: str, nbytes: float, on_cpu: bool) -> Item:
        """nbytes per rank, held on its GPU or in its node's host memory (gpn ranks per node)."""
        return Item(name, 0.0 if on_cpu else nbytes, nbytes * gpn if on_cpu else 0.0)

    # Policy model states, following stage3.py. Without offload: p-byte param shard (2), p-byte gradient
    # partition (grad_accum_dtype defaults to the model dtype: 2), fp32 master copy (4; none in fp32 training,
    # where DeepSpeed steps the params in place) and Adam m, v (8): 16 B/param in bf16, over all G GPUs.
    # offload_optimizer moves grads + master + Adam to the host (the gradient partition lives on the
    # optimizer's device); offload_params moves the param shard.
    # The fp32 gradient the optimizer steps on is one extra buffer of the largest sub-group
    # (<= sub_group_size elements) on GPU, but a whole fp32 copy of the shard with optimizer offload
    # (one pinned buffer per sub-group).
    master = 0 if (setup.precision == "fp32" and not setup.offload_optimizer) else 4
    # LoRA: the base is frozen (its p-byte shard only); grads, master weights and Adam exist for the adapter alone,
    # whose p-byte shard joins the params. The gathered module then needs no full gradient.
    trained = model.lora_params(setup.lora_r) / setup.total_gpus if setup.lora_r else shard
    fp32_grads = 4 * (trained if setup.offload_optimizer else min(SUB_GROUP, trained))
    # QLoRA: ZeRO-3 shards the packed 4-bit weights like any tensor; their quantization constants (not
    # parameters) stay whole on every GPU.
    base_bytes, nf4_constants = (model.quantized_base_bytes(p) if setup.lora_quantize else (p * model.params, 0.0))
    items = [
        placed(POLICY_PARAMS, base_bytes / setup.total_gpus + (p * trained if setup.lora_r else 0),
               setup.offload_params),
        placed(POLICY_GRADS, p * trained, setup.offload_optimizer),
        placed(POLICY_OPTIMIZER, (master + 8) * trained, setup.offload_optimizer),
        placed(POLICY_FP32_GRADS, fp32_grads, setup.offload_optimizer),
        # ZeRO-3 working buffers, always on GPU: the largest module gathered in full with its full gradient
        # before the reduce-scatter (DeepSpeed's estimator budgets the same 4 B/param in bf16), the params
        # prefetched ahead (prefetch bucket) and the contiguous gradient bucket (reduce bucket).
        Item(ZERO3_GATHERED, (1 if setup.lora_r else 2) * p * largest, 0.0),
        Item(ZERO3_BUCKETS, p * (PREFETCH_BUCKET + REDUCE_BUCKET), 0.0),
    ]
    if setup.lora_quantize:
        items.append(Item(NF4_CONSTANTS, nf4_constants, 0.0))
    # Frozen reference: its own ZeRO-3 engine without grads or optimizer: a p-byte shard on GPU or in host
    # memory, plus its gathered largest module and prefetch bucket on GPU while it runs. With LoRA the reference
    # is the policy's own base (adapter off): nothing more to hold.
    if setup.reference in ("gpu", "offload") and not setup.lora_r:
        items += [placed("reference params", p * shard, setup.reference == "offload"),
                  Item("reference gathered module + prefetch", p * (largest + PREFETCH_BUCKET), 0.0)]
    # Activations with gradient checkpointing, for T = 2 * micro_batch * seq_len tokens per GPU: each layer
    # keeps only its input hidden state (L * T * h * p), and backward recomputes one layer at a time; we add
    # that layer's saved tensors and budget as much again for the gradients flowing through it.
    # The reference forward runs under no_grad before the policy's and frees everything but its log-probs.
    tokens = setup.tokens_per_gpu
    items += [
        Item("activation checkpoints", model.num_layers * tokens * model.hidden_size * p, 0.0),
        Item("layer recompute + its grads", 2 * tokens * model.layer_activation_bytes_per_token(p), 0.0),
    ]
    if setup.fused_lm_head:
        # Log-probs inside lm_head (logprobs.head_sequence_logps): no [T, V] logits. At a time two fp32 blocks of
        # LOGPROB_CHUNK x V elements (logits/softmax and their gradient) and a p-byte copy; plus the scored
        # positions' hidden states (p bytes) and their fp32 gradient, budgeted for all T tokens.
        items.append(Item("log-probs in lm_head (fused, chunked)",
                          LOGPROB_CHUNK * model.vocab_size * (8 + p) + tokens * model.hidden_size * (p + 4), 0.0))
    else:
        # The p-byte logits and, in backward, their gradient (T * V * p each); the log-softmax runs in fp32 on
        # LOGPROB_CHUNK sequence positions of all 2*mb rows at a time: the fp32 upcast and its log-softmax.
        items.append(Item("logits + chunked fp32 log-softmax",
                          2 * tokens * model.vocab_size * p
                          + 2 * 2 * setup.micro_batch_size * min(LOGPROB_CHUNK, setup.seq_len) * model.vocab_size * 4,
                          0.0))
    return Plan(model, setup, tuple(items), flops(model, setup))


def flops(model: ModelShape, setup: Setup) -> Flops:
    """Model FLOPs of one micro-step over all GPUs (MFU convention: gradient-checkpoint recompute not counted).

    Dense: 2 FLOPs per active parameter per token forward, 4 backward: the policy costs 6N per token and
    the live reference's forward 2N (8N with a reference, 6N when its log-probs are precomputed). LoRA: the
    frozen base needs no weight gradients, so the policy's backward is 2N (input gradients; the adapter's own
    FLOPs are negligible): 6N with the reference forward, 4N precomputed.
    Attention (the QK^T and AV matmuls the 2N rule misses): 4 * seq * q_dim FLOPs per token per layer
    forward, halved for the causal mask, so 2 * L * seq * q_dim per token forward, times the same 6 + 2.
    """
    tokens = setup.tokens_per_gpu * setup.total_gpus
    # every sequence is seq_len long: the squared lengths sum to tokens * seq_len
    return model_flops(model, tokens, tokens * setup.seq_len, lora=bool(setup.lora_r),
                       live_reference=setup.reference in ("gpu", "offload"))


def model_flops(model: ModelShape, tokens: int | float, squared_lengths: int | float, lora: bool,
                live_reference: bool) -> Flops:
    """The FLOP model of `flops` for any batch (shared with `dpo-ds bench`): `tokens` tokens in sequences whose
    squared lengths sum to `squared_lengths`, 2 FLOPs per active parameter per token and pass plus causal
    attention 2 * layers * q_dim * length^2 per sequence and pass, times 6 + 2 (see `flops`)."""
    factor = (4 if lora else 6) + (2 if live_reference else 0)
    return Flops(tokens, factor * model.active_params * tokens, factor * model.num_layers * model.q_dim * squared_lengths)


def smallest_fit(model: ModelShape, setup: Setup, max_nodes: int = NODE_COUNTS_CAP) -> Plan | None:
    """The first setting that fits, on the machines given first: the given node count as is, then with
    optimizer offload, then with optimizer and param offload (starting from the offload flags given, never
    removing one), then each of those with the micro batch halved, down to 1; only then the same search on
    more nodes: 2, 4, ... times up to max_nodes."""
    node_counts = [setup.nodes] + [n for n in (2**k for k in range(max_nodes.bit_length())) if setup.nodes < n <= max_nodes]
    offloads = list(dict.fromkeys([(setup.offload_optimizer, setup.offload_params),
                                   (True, setup.offload_params), (True, True)]))
    micro_batches = [setup.micro_batch_size >> k for k in range(setup.micro_batch_size.bit_length())]
    for nodes in node_counts:
        for micro_batch in micro_batches:
            for offload_optimizer, offload_params in offloads:
                candidate = plan(model, dataclasses.replace(
                    setup, nodes=nodes, micro_batch_size=micro_batch,
                    offload_optimizer=offload_optimizer, offload_params=offload_params))
                if candidate.fits:
                    return candidate
    return None


# ds_configs preset of each (offload_optimizer, offload_params) setting; params alone have none.
PRESETS_BY_OFFLOAD = {(False, False): "ds_configs/zero3.json", (True, False): "ds_configs/zero3_offload_optimizer.json",
                      (True, True): "ds_configs/zero3_offload_all.json"}
REFERENCE_FLAGS = {"gpu": ["--ref_offload", "false"], "offload": [], "precomputed": ["--precompute_ref", "true"],
                   "none": ["--reference_free", "true"]}


def train_flags(result: Plan) -> list[str]:
    """The `dpo-ds train` flags of a plan's setting (run on its node and GPU counts)."""
    s = result.setup
    preset = PRESETS_BY_OFFLOAD.get((s.offload_optimizer, s.offload_params))
    flags = ["--micro_batch_size", str(s.micro_batch_size), "--max_length", str(s.seq_len), "--precision", s.precision]
    flags += ["--deepspeed_config", preset] if preset else []
    if s.lora_r:  # the reference is the policy's own base: no reference engine to place
        flags += ["--lora_r", str(s.lora_r)] + (["--lora_quantize", s.lora_quantize] if s.lora_quantize else [])
        flags += [] if s.reference in ("gpu", "offload") else REFERENCE_FLAGS[s.reference]
    else:
        flags += REFERENCE_FLAGS[s.reference]
    return flags + ([] if s.fused_lm_head else ["--fused_lm_head", "false"])


# ----------------------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"a config.json, a model directory, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--nodes", type=_positive_int, default=1)
    parser.add_argument("--gpus_per_node", type=_positive_int, default=8)
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    parser.add_argument("--cpu_memory_gb", type=float, default=DEFAULT_CPU_MEMORY_GB,
                        help=f"host memory per node, GiB (default {DEFAULT_CPU_MEMORY_GB}: a DGX H100 / A100-80GB)")
    parser.add_argument("--seq_len", type=_positive_int, default=4096, help="tokens per sequence, prompt + completion")
    parser.add_argument("--micro_batch_size", type=_positive_int, default=1,
                        help="preference pairs per GPU per micro-step (each pair is 2 sequences)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--reference", choices=REFERENCE_MODES, default="offload",
                        help="where the frozen reference model lives: sharded on GPU, offloaded to CPU (default, as "
                             "train's ref_offload), precomputed log-probs, or none (reference-free)")
    parser.add_argument("--offload_optimizer", action="store_true", help="ZeRO-3 offload_optimizer to CPU")
    parser.add_argument("--offload_params", action="store_true", help="ZeRO-3 offload_param to CPU")
    parser.add_argument("--fused_lm_head", choices=("true", "false"), default="true",
                        help="as the train field: log-probs inside lm_head (true, default) or from full logits")
    parser.add_argument("--lora_r", type=int, default=0,
                        help="LoRA rank (as the train field): > 0 budgets adapters on all linear layers of a frozen "
                             "bf16 base, optimizer states for the adapter only, and the reference as the base itself")
    parser.add_argument("--lora_quantize", choices=("nf4",), default=None,
                        help="with --lora_r, as the train field: QLoRA, the base's Linear weights in nf4 (0.5 byte per "
                             "param, sharded) plus their quantization constants (whole on every GPU), and the whole "
                             "4-bit base on each GPU while it loads, before ZeRO-3 partitions it")
    parser.add_argument("--max_nodes", type=_positive_int, default=NODE_COUNTS_CAP,
                        help=f"largest node count the fit search tries (default {NODE_COUNTS_CAP})")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")


def _setting(result: Plan) -> str:
    s = result.setup
    offload = [name for name, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on]
    return (f"{s.nodes} node(s) x {s.gpus_per_node} GPUs, offload: {' + '.join(offload) or 'none'}, "
            f"micro batch {s.micro_batch_size}")


def render(result: Plan, fit: Plan | None, max_nodes: int) -> str:
    m, s, gpn = result.model, result.setup, result.setup.gpus_per_node
    active = f", {m.active_params / 1e9:.2f} B active" if m.active_params != m.params else ""

    def row(name: str, gpu: float, cpu: float) -> str:
        return f"{name:<40}{gpu / GIB:>10.2f}{gpu * gpn / GIB:>10.2f}{cpu / GIB:>10.2f}"

    if fit is None:
        smallest = f"nothing fits on up to {max_nodes} nodes"
    else:
        where = ("on these machines" if fit.setup.nodes == s.nodes
                 else f"not on {s.nodes} node(s) with any offload or micro batch; needs more nodes")
        smallest = (f"{_setting(fit)} ({where}): GPU {fit.gpu_bytes / GIB:.1f} GiB, CPU "
                    f"{fit.cpu_bytes_per_node / GIB:.1f} GiB/node\n          dpo-ds train {' '.join(train_flags(fit))} "
                    f"on {fit.setup.nodes} node(s) x {fit.setup.gpus_per_node} GPUs")
    return "\n".join([
        f"model     {m.name} ({m.model_type}): N = {m.params:,} params ({m.params / 1e9:.2f} B{active}), "
        f"largest module {m.largest_module_params / 1e6:.1f} M",
        f"setup     {_setting(result)} ({s.total_gpus} GPUs), seq {s.seq_len}, {s.precision}, "
        f"reference {s.reference}" + (" (LoRA: the base with the adapter off)" if s.lora_r else ""),
        *([f"LoRA      r = {s.lora_r} on all linear layers: {m.lora_params(s.lora_r):,} trained params "
           f"({m.lora_params(s.lora_r) / m.params:.2%} of N); base frozen"
           + (f", {m.linear_weight_params:,} of its params in {s.lora_quantize} (QLoRA; the whole 4-bit base is "
              f"{result.load_gpu_bytes / GIB:.2f} GiB on each GPU while it loads)" if s.lora_quantize else "")]
          if s.lora_r else []),
        f"          GPU {s.gpu_memory_gb:g} GiB, host {s.cpu_memory_gb:g} GiB per node; "
        f"{HEADROOM:.0%} of each kept free",
        "",
        f"{'memory (GiB)':<40}{'per GPU':>10}{'GPU/node':>10}{'CPU/node':>10}",
        *(row(item.name, item.gpu_bytes, item.cpu_bytes_per_node) for item in result.items),
        row("total", result.gpu_bytes, result.cpu_bytes_per_node),
        row(f"budget (capacity - {HEADROOM:.0%})", result.gpu_budget_bytes, result.cpu_budget_bytes),
        f"fits      {'yes' if result.fits else 'NO'} (GPU {'yes' if result.fits_gpu else 'no'}, "
        f"CPU {'yes' if result.fits_cpu else 'no'})",
        f"smallest  {smallest}",
        "",
        f"compute   one micro-step on all GPUs: {result.flops.tokens:,} tokens, dense {result.flops.dense:.3e} "
        f"+ attention {result.flops.attention:.3e} = {result.flops.total:.3e} FLOPs "
        f"({result.flops.total / s.total_gpus:.3e} per GPU)",
    ])


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit 0 whether or not it fits (`fits` says; a wrong input exits with a message)."""
    setup = Setup(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                  cpu_memory_gb=args.cpu_memory_gb, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                  precision=args.precision, reference=args.reference,
                  offload_optimizer=args.offload_optimizer, offload_params=args.offload_params,
                  fused_lm_head=args.fused_lm_head == "true", lora_r=args.lora_r, lora_quantize=args.lora_quantize)
    if args.lora_r < 0:
        raise SystemExit(f"dpo-ds plan: --lora_r must be >= 0 (0 = full fine-tuning), got {args.lora_r}")
    if args.lora_quantize and not args.lora_r:
        raise SystemExit("dpo-ds plan: --lora_quantize quantizes the frozen base of a LoRA run; give --lora_r too")
    model = load_shape(args.model)
    result = plan(model, setup)
    fit = smallest_fit(model, setup, args.max_nodes)
    if not args.json:
        emit(render(result, fit, args.max_nodes))
        return 0
    smallest = fit and {"nodes": fit.setup.nodes, "offload_optimizer": fit.setup.offload_optimizer,
                        "offload_params": fit.setup.offload_params, "micro_batch_size": fit.setup.micro_batch_size,
                        "gpu_gib_per_gpu": round(fit.gpu_bytes / GIB, 3),
                        "cpu_gib_per_node": round(fit.cpu_bytes_per_node / GIB, 3), "train_flags": train_flags(fit)}
    emit(json.dumps({**result.to_dict(), "smallest_fit": smallest}, indent=2))
    return 0
