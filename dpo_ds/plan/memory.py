"""The memory model of `dpo-ds plan`: what one GPU and one node's host hold during a DPO run on DeepSpeed ZeRO-3,
item by item (the FLOPs and the projected step time: `compute`).

The model follows DeepSpeed ZeRO-3 as implemented in `deepspeed/runtime/zero/stage3.py` (0.19.x) with its default
bucket sizes, Hugging Face gradient checkpointing (one checkpoint per decoder layer) and flash/SDPA attention (no
seq x seq score matrix is stored). Units: bytes; GiB (2**30) in reports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpo_ds.config import FIELDS
from dpo_ds.plan.shapes import ModelShape

GIB = 2**30
# Kept free on every GPU and on every node's host: the CUDA context, NCCL buffers, allocator
# fragmentation; the OS, page cache and data loaders on the host.
HEADROOM = 0.10
# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py), in elements.
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size: params gathered ahead of use
REDUCE_BUCKET = 500_000_000  # reduce_bucket_size: the contiguous gradient bucket, allocated once
SUB_GROUP = 1_000_000_000  # sub_group_size: the optimizer steps the local shard this many elements at a time
# Tokens per chunk of the fp32 log-softmax over the vocabulary (the log-probs are computed chunk by chunk).
LOGPROB_CHUNK = FIELDS["logprob_chunk_size"].default  # the trainer's default chunk (sequence positions)
DEFAULT_CPU_MEMORY_GB = 2048  # DGX H100 / DGX A100-80GB hosts: 2 TB per node of 8 GPUs
REFERENCE_MODES = ("gpu", "offload", "precomputed", "none")


@dataclass(frozen=True)
class Setup:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    cpu_memory_gb: float
    seq_len: int
    micro_batch_size: int  # preference pairs per GPU per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step (FLOPs and time only, not memory)
    precision: str = "bf16"
    reference: str = "gpu"
    offload_optimizer: bool = False
    offload_params: bool = False
    fused_lm_head: bool = True  # the trainer's default: used where the model returns lm_head's output as is
    lora_r: int = 0  # > 0: LoRA adapters of this rank on all-linear, base frozen; the reference is the base itself
    lora_quantize: str | None = None  # "nf4" (with lora_r): QLoRA, the frozen base's Linear weights in 4 bits
    sequence_parallel_size: int = 1  # S GPUs share every sequence (Ulysses): each holds 1/S of its tokens
    gradient_checkpointing: bool = True  # plan assumes it; train's `auto` asks what a step needs without it

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens_per_gpu(self) -> int:
        """Each pair is a chosen and a rejected sequence, padded to seq_len; under sequence parallelism a GPU
        holds its 1/S of them (the sequence padded to a multiple of S)."""
        return 2 * self.micro_batch_size * -(-self.seq_len // self.sequence_parallel_size)


@dataclass(frozen=True)
class Item:
    """One memory consumer: bytes on each GPU and bytes of host memory per node."""

    name: str
    gpu_bytes: float
    cpu_bytes_per_node: float


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    setup: Setup
    items: tuple[Item, ...]

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
            "model": dataclasses.asdict(self.model),
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
        }


POLICY_PARAMS = "policy params"
POLICY_GRADS = "policy grads"
POLICY_OPTIMIZER = "policy fp32 master + Adam m, v"
POLICY_FP32_GRADS = "policy fp32 grads (optimizer step)"
ZERO3_GATHERED = "ZeRO-3 gathered module (params + grads)"
ZERO3_BUCKETS = "ZeRO-3 prefetch + reduce buckets"
NF4_CONSTANTS = "nf4 quantization constants (every GPU)"
REFERENCE_PARAMS = "reference params"
REFERENCE_GATHERED = "reference gathered module + prefetch"
MODEL_STATES = (POLICY_PARAMS, POLICY_GRADS, POLICY_OPTIMIZER, POLICY_FP32_GRADS, ZERO3_GATHERED)
# every item that is not an activation (what depends on the ZeRO stage, not on the batch)
NOT_ACTIVATIONS = MODEL_STATES + (ZERO3_BUCKETS, NF4_CONSTANTS, REFERENCE_PARAMS, REFERENCE_GATHERED)


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
        items += [placed(REFERENCE_PARAMS, p * shard, setup.reference == "offload"),
                  Item(REFERENCE_GATHERED, p * (largest + PREFETCH_BUCKET), 0.0)]
    # Activations with gradient checkpointing, for T = 2 * micro_batch * seq_len / S tokens per GPU: each layer
    # keeps only its input hidden state (L * T * h * p), and backward recomputes one layer at a time; we add
    # that layer's saved tensors and budget as much again for the gradients flowing through it.
    # The reference forward runs under no_grad before the policy's and frees everything but its log-probs.
    # Under Ulysses (S > 1) everything outside attention is per token (the rank's T); attention sees the whole
    # sequence for 1/S of the heads, as many elements as T tokens of all heads.
    # Without checkpointing every layer keeps all it saves for backward, and the gradients flowing through one
    # layer at a time are budgeted as above.
    tokens = setup.tokens_per_gpu
    layer = tokens * model.layer_activation_bytes_per_token(p)
    if setup.gradient_checkpointing:
        items += [Item("activation checkpoints", model.num_layers * tokens * model.hidden_size * p, 0.0),
                  Item("layer recompute + its grads", 2 * layer, 0.0)]
    else:
        items += [Item("saved activations (no checkpointing)", model.num_layers * layer, 0.0),
                  Item("one layer's grads", layer, 0.0)]
    if setup.sequence_parallel_size > 1:
        # DeepSpeed's all-to-all of one attention layer: q, k, v exchanged in and the output back (a copy of each
        # next to the exchanged tensor), in the backward as well: 2 x (2 q_dim + 2 kv_dim) x T elements
        exchanged = 2 * (2 * model.q_dim + 2 * model.kv_dim) * tokens
        items.append(Item("Ulysses all-to-all buffers (one layer)", exchanged * p, 0.0))
    if setup.fused_lm_head and model.fused_head:
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
                          + 2 * 2 * setup.micro_batch_size * min(LOGPROB_CHUNK, tokens // (2 * setup.micro_batch_size))
                          * model.vocab_size * 4,
                          0.0))
    return Plan(model, setup, tuple(items))


def replicated_bytes(model: ModelShape, setup: Setup, stage: int) -> float:
    """Bytes one rank holds in a full fine-tune at ZeRO stage 0, 1 or 2, where every rank holds the whole model
    (`setup.total_gpus` data-parallel ranks). Following `deepspeed/runtime/zero/stage_1_and_2.py` and
    `bf16_optimizer.py`: p-byte params; p-byte gradients, partitioned from stage 2; fp32 master (bf16 only) and
    Adam m, v, partitioned from stage 1, and in bf16 the fp32 gradients the optimizer steps on, partitioned with
    them. A live reference is a whole p-byte copy (an unpartitioned inference engine). Activations as in `plan`."""
    p, n, ranks = setup.dtype_bytes, model.params, setup.total_gpus
    bf16 = setup.precision == "bf16"
    optimizer_share = n / (ranks if stage >= 1 else 1)
    grads = p * n / (ranks if stage >= 2 else 1)
    optimizer = ((4 if bf16 else 0) + 8 + (4 if bf16 else 0)) * optimizer_share
    reference = p * n if setup.reference in ("gpu", "offload") else 0.0
    activations = sum(item.gpu_bytes for item in plan(model, setup).items if item.name not in NOT_ACTIVATIONS)
    return p * n + grads + optimizer + reference + activations
