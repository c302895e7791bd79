"""The compute side of `dpo-ds plan`: the FLOPs of one DPO optimizer step, the GPUs' dense bf16 peaks, and the step
time and tokens/s a run reaches at an assumed MFU.

`dpo-ds bench` counts its achieved FLOP/s with the same `step_flops` and looks its device's peak up in the same
`GPUS` table, so the MFU a GPU run measures and the MFU plan assumes are the same ratio of the same count.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpo_ds.plan.memory import Setup
from dpo_ds.plan.shapes import ModelShape


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float  # dense bf16 tensor-core TFLOP/s of one GPU (the vendor's datasheet figure without sparsity)
    memory_gb: float    # its memory, as plan's --gpu_memory_gb counts it


GPUS = {gpu.name: gpu for gpu in (
    Gpu("A100", 312.0, 80),        # A100 SXM4 / PCIe, 80 GB (the 40 GB card: --gpu_memory_gb 40)
    Gpu("H100", 989.0, 80),        # H100 SXM5, as in a DGX H100
    Gpu("H100-PCIe", 756.0, 80),
    Gpu("H100-NVL", 835.0, 94),
    Gpu("H200", 989.0, 141),       # H100's tensor cores with more, faster memory
    Gpu("GH200", 989.0, 96),       # the Grace Hopper superchip's H100 (96 GB HBM3 version)
    Gpu("B200", 2250.0, 180),      # HGX / DGX B200
    Gpu("GB200", 2500.0, 186),     # one Blackwell GPU of a GB200 (NVL72)
    Gpu("L40S", 362.0, 48),
    Gpu("A10G", 125.0, 24),        # AWS g5 instances
)}
# What plan assumed before it could be told the GPU: 80 GB GPUs in DGX H100 / A100-80GB nodes.
DEFAULT_GPU = "H100"

# The MFU a projection assumes unless --mfu gives one. MFU here counts every FLOP of `step_flops`, the recompute
# of gradient checkpointing included (PaLM's "hardware FLOPs utilization"; it is the higher of the two).
ASSUMED_MFU = 0.40
ASSUMED_MFU_WHY = ("typical of bf16 transformer training on A100/H100 (published runs: 35-55%); not yet measured "
                   "for dpo-ds on a GPU (benchmarks/gpu.sh measures it; --mfu sets yours)")


def gpu_of_device(device_name: str) -> Gpu | None:
    """The table's GPU for a CUDA device name ("NVIDIA H100 80GB HBM3", "NVIDIA GH200 480GB", "NVIDIA H100 PCIe"):
    the longest table name the device name contains (GH200 rather than H200), ignoring case, with spaces read as
    dashes; None for a device the table does not have."""
    name = device_name.upper().replace(" ", "-")
    found = [gpu for gpu in GPUS.values() if gpu.name.upper() in name]
    return max(found, key=lambda gpu: len(gpu.name), default=None)


@dataclass(frozen=True)
class Flops:
    tokens: float  # the tokens counted (every sequence once, also when S GPUs share it)
    terms: tuple[tuple[str, int], ...]  # (pass, FLOPs per active parameter per token) of the dense count
    dense: float
    attention: float

    @property
    def dense_factor(self) -> int:
        return sum(factor for _, factor in self.terms)

    @property
    def total(self) -> float:
        return self.dense + self.attention


def step_flops(model: ModelShape, tokens: float, squared_lengths: float, *, lora: bool, recompute: bool,
               live_reference: bool) -> Flops:
    """FLOPs of `tokens` tokens in sequences whose squared lengths sum to `squared_lengths`, for every pass a DPO
    step makes over them.

    Dense (the matmuls with weights): 2 FLOPs per active parameter (what a token passes through: an MoE token
    visits experts_per_token experts) per token and pass. The policy's forward and backward cost 6N (the backward
    computes input and weight gradients: 4N). LoRA: the frozen base needs no weight gradients, so 4N; the
    adapter's own r x (in + out) matmuls are left out (under 1% of N at the usual ranks). Gradient checkpointing
    recomputes the forward in the backward: 2N more. A live reference (not precompute_ref) runs one forward: 2N.
    Attention (the QK^T and AV matmuls the 2N rule misses): 4 x q_dim x length^2 FLOPs per sequence and layer
    forward, halved by the causal mask; its backward is twice its forward also under LoRA (both operands are
    activations), and the recompute and the reference forward add one forward each. Not counted: norms, RoPE,
    softmax, the loss, the optimizer step, and the extra MLP forward of tiled_mlp. N counts every parameter, the
    input embedding of an untied model too (a lookup, no matmul; ~6% of a 1B model, ~6.5% of Llama-3-8B), so MFU
    reads that much higher than a count of non-embedding parameters would: the convention of `6N` with N the
    model's size, the same in plan and bench.
    """
    policy = 4 if lora else 6
    terms = (("policy forward + backward", policy),
             *((("checkpoint recompute", 2),) if recompute else ()),
             *((("reference forward", 2),) if live_reference else ()))
    forwards = 3 + recompute + live_reference  # attention's forward-equivalents: the policy's forward + backward is 3
    dense = sum(factor for _, factor in terms) * model.active_params * tokens
    attention = forwards * 2 * model.num_layers * model.q_dim * squared_lengths
    return Flops(tokens, terms, dense, attention)


def setup_flops(model: ModelShape, setup: Setup, recompute: bool = True) -> Flops:
    """FLOPs of one optimizer step of a plan's setting on all its GPUs: gradient_accumulation_steps micro-steps,
    each of micro_batch_size pairs (2 sequences of seq_len, padded to a multiple of S) per data-parallel group;
    with gradient checkpointing unless `recompute` is False (plan's memory model assumes it: train's default)."""
    sp = setup.sequence_parallel_size
    length = -(-setup.seq_len // sp) * sp
    sequences = 2 * setup.micro_batch_size * setup.gradient_accumulation_steps * setup.total_gpus // sp
    return step_flops(model, sequences * length, sequences * length**2, lora=bool(setup.lora_r), recompute=recompute,
                      live_reference=setup.reference in ("gpu", "offload"))


@dataclass(frozen=True)
class Projection:
    """What `flops` take on `gpus` GPUs of `peak_tflops` each, at utilization `mfu`."""

    flops: Flops
    gpus: int
    peak_tflops: float
    mfu: float

    @property
    def step_time_s(self) -> float:
        return self.flops.total / (self.gpus * self.peak_tflops * 1e12 * self.mfu)

    @property
    def tokens_per_s(self) -> float:
        return self.flops.tokens / self.step_time_s

    def to_dict(self) -> dict:
        return {"peak_tflops_per_gpu": self.peak_tflops, "assumed_mfu": self.mfu, "gpus": self.gpus,
                "flops_per_step": self.flops.total, "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens_per_s, "tokens_per_s_per_gpu": self.tokens_per_s / self.gpus}
