"""`dpo-ds plan`: will a DPO run fit, and what does one micro-step cost?

Everything here is arithmetic on the model's shape (no weights, no GPU): `shapes` counts the model's parameters
on the meta device, `memory` models what each GPU and node holds, `search` finds a setting that fits; this module
is the command (its options and report).
"""
from __future__ import annotations

import argparse
import json

from dpo_ds.console import emit
from dpo_ds.plan.compute import (
    ASSUMED_MFU,
    ASSUMED_MFU_WHY,
    DEFAULT_GPU,
    GPUS,
    Flops,
    Gpu,
    Projection,
    gpu_of_device,
    setup_flops,
    step_flops,
)
from dpo_ds.plan.memory import DEFAULT_CPU_MEMORY_GB, GIB, HEADROOM, REFERENCE_MODES, SUB_GROUP, Plan, Setup, plan
from dpo_ds.plan.search import NODE_COUNTS_CAP, longest_seq_len, smallest_fit, train_flags
from dpo_ds.plan.shapes import PRESETS, ModelShape, load_shape, model_config_and_name, shape_from_config

__all__ = ["ASSUMED_MFU", "DEFAULT_CPU_MEMORY_GB", "DEFAULT_GPU", "GIB", "GPUS", "HEADROOM", "NODE_COUNTS_CAP",
           "PRESETS", "REFERENCE_MODES", "SUB_GROUP", "Flops", "Gpu", "ModelShape", "Plan", "Projection", "Setup",
           "gpu_of_device", "load_shape", "longest_seq_len", "model_config_and_name", "plan", "setup_flops",
           "shape_from_config", "smallest_fit", "step_flops", "train_flags"]

HELP = """Estimate per-GPU and per-node memory, the FLOPs of one DPO optimizer step and its projected time on
DeepSpeed ZeRO-3, from a model's config alone (a preset name, a config.json, or a model directory; nothing is downloaded).
Counts the policy's ZeRO-3 model states (bf16 params and grads, fp32 master weights and Adam moments,
sharded over all GPUs or offloaded to CPU), the ZeRO-3 gather/bucket buffers, the frozen reference model
(on GPU, offloaded to CPU, or precomputed), gradient-checkpointed activations and the log-probs (inside
lm_head, or from full logits); --lora_r R budgets LoRA instead: the frozen base as a sharded bf16 shard,
grads and optimizer states for the adapter only, no reference model (the base with the adapter off), and with
--lora_quantize nf4 QLoRA: the base's Linear weights at 0.5 byte/param (sharded) plus their absmax constants;
--sequence_parallel_size S: S GPUs share every sequence (DeepSpeed's Ulysses), each holding the activations of
1/S of its tokens plus one layer's all-to-all buffers, and it reports the longest seq_len that fits. It says
whether that fits in GPU memory and CPU memory per node, keeping 10% of each as headroom; and searches for a
setting that fits, on the given machines first (optimizer offload, then parameter offload, then halving the
micro batch down to 1), then on 2, 4, ... times the nodes up to --max_nodes, and prints the `dpo-ds train`
flags and ds_configs preset of the answer. The reference defaults to train's: offloaded to CPU.
Speed: the step's FLOPs (policy forward + backward 6N per token, 4N with LoRA; the gradient-checkpoint recompute 2N;
a live reference's forward 2N; causal attention) over --gpu's dense bf16 peak times an assumed MFU (--mfu, default
{mfu:.0%}) give the projected step time and tokens/s (bf16 only); --gpu also sets the GPU's memory.
Example: dpo-ds plan --model llama-70b --nodes 4 --gpus_per_node 8 --seq_len 4096 --reference offload
Long context: dpo-ds plan --model llama3-8b --seq_len 65536 --sequence_parallel_size 8""".format(mfu=ASSUMED_MFU)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _gpu(text: str) -> Gpu:
    by_name = {name.lower(): gpu for name, gpu in GPUS.items()}
    if text.lower() not in by_name:
        raise argparse.ArgumentTypeError(f"unknown GPU {text!r}: one of {', '.join(GPUS)}")
    return by_name[text.lower()]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"a config.json, a model directory, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--nodes", type=_positive_int, default=1)
    parser.add_argument("--gpus_per_node", type=_positive_int, default=8)
    parser.add_argument("--gpu", type=_gpu, default=GPUS[DEFAULT_GPU],
                        help=f"the GPU: {', '.join(GPUS)} (default {DEFAULT_GPU}); sets its memory and the dense bf16 "
                             "peak the projected step time is computed from")
    parser.add_argument("--gpu_memory_gb", type=float,
                        help=f"memory of one GPU, GiB (default: --gpu's, {GPUS[DEFAULT_GPU].memory_gb:g} for the "
                             f"{DEFAULT_GPU})")
    parser.add_argument("--cpu_memory_gb", type=float, default=DEFAULT_CPU_MEMORY_GB,
                        help=f"host memory per node, GiB (default {DEFAULT_CPU_MEMORY_GB}: a DGX H100 / A100-80GB)")
    parser.add_argument("--seq_len", type=_positive_int, default=4096, help="tokens per sequence, prompt + completion")
    parser.add_argument("--micro_batch_size", type=_positive_int, default=1,
                        help="preference pairs per GPU per micro-step (each pair is 2 sequences)")
    parser.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                        help="as the train field: micro-steps per optimizer step (counted in the step's FLOPs and time)")
    parser.add_argument("--mfu", type=_fraction, default=ASSUMED_MFU,
                        help=f"the FLOPs utilization (MFU, the checkpoint recompute counted) the projected step time "
                             f"assumes (default {ASSUMED_MFU}: "
                             f"{ASSUMED_MFU_WHY.replace('%', '%%')})")
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
    parser.add_argument("--sequence_parallel_size", type=_positive_int, default=1,
                        help="as the train field: S GPUs share every sequence (DeepSpeed's Ulysses), each holding 1/S "
                             "of its tokens; S divides the GPUs and the attention heads (default 1)")
    parser.add_argument("--max_nodes", type=_positive_int, default=NODE_COUNTS_CAP,
                        help=f"largest node count the fit search tries (default {NODE_COUNTS_CAP})")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")


def _setting(result: Plan) -> str:
    s = result.setup
    offload = [name for name, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on]
    return (f"{s.nodes} node(s) x {s.gpus_per_node} GPUs, offload: {' + '.join(offload) or 'none'}, "
            f"micro batch {s.micro_batch_size}")


def _assumption(mfu: float) -> str:
    """Where the projection's MFU comes from, for the text and the JSON alike."""
    return ASSUMED_MFU_WHY if mfu == ASSUMED_MFU else "given by --mfu"


def _projection_lines(flops: Flops, s: Setup, gpu: Gpu, mfu: float) -> list[str]:
    """The step's FLOPs, pass by pass, and (bf16) the time and tokens/s they take at the assumed MFU."""
    groups = s.total_gpus // s.sequence_parallel_size
    lines = [
        f"compute   one optimizer step ({s.micro_batch_size} pair(s) x {s.gradient_accumulation_steps} micro-step(s) "
        f"x {groups} data-parallel group(s)): {flops.tokens:,} tokens x {flops.dense_factor}·N ("
        + ", ".join(f"{name} {factor}·N" for name, factor in flops.terms) + ")",
        f"          dense {flops.dense:.3e} + attention {flops.attention:.3e} = {flops.total:.3e} FLOPs "
        f"({flops.total / s.total_gpus:.3e} per GPU)",
    ]
    if s.precision != "bf16":
        return lines + [f"speed     not projected for {s.precision}: the peak table is dense bf16"]
    projected = Projection(flops, s.total_gpus, gpu.peak_tflops, mfu)
    lines += [
        f"speed     {gpu.name}, {gpu.peak_tflops:g} TFLOP/s dense bf16 per GPU: projected {projected.step_time_s:.3g} s "
        f"per optimizer step, {projected.tokens_per_s:,.0f} tokens/s ({projected.tokens_per_s / s.total_gpus:,.0f} "
        "per GPU)",
        f"          assumes {mfu:.0%} MFU: {_assumption(mfu)}",
    ]
    if s.offload_optimizer or s.offload_params:
        lines.append("          (offload: the CPU optimizer step and the PCIe traffic are not in it; expect slower)")
    return lines


def render(result: Plan, fit: Plan | None, max_nodes: int, longest: int | None, gpu: Gpu, mfu: float) -> str:
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
        f"setup     {_setting(result)} ({s.total_gpus} GPUs), seq {s.seq_len}"
        + (f" shared by {s.sequence_parallel_size} GPUs (Ulysses)" if s.sequence_parallel_size > 1 else "")
        + f", {s.precision}, "
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
        f"longest   seq_len {longest:,} fits with this setting" if longest else
        "longest   no seq_len fits with this setting",
        "",
        *_projection_lines(setup_flops(m, s), s, gpu, mfu),
    ])


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit 0 whether or not it fits (`fits` says; a wrong input exits with a message)."""
    memory_gb = args.gpu.memory_gb if args.gpu_memory_gb is None else args.gpu_memory_gb
    setup = Setup(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=memory_gb,
                  cpu_memory_gb=args.cpu_memory_gb, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  precision=args.precision, reference=args.reference,
                  offload_optimizer=args.offload_optimizer, offload_params=args.offload_params,
                  fused_lm_head=args.fused_lm_head == "true", lora_r=args.lora_r, lora_quantize=args.lora_quantize,
                  sequence_parallel_size=args.sequence_parallel_size)
    if args.lora_r < 0:
        raise SystemExit(f"dpo-ds plan: --lora_r must be >= 0 (0 = full fine-tuning), got {args.lora_r}")
    if args.lora_quantize and not args.lora_r:
        raise SystemExit("dpo-ds plan: --lora_quantize quantizes the frozen base of a LoRA run; give --lora_r too")
    model = load_shape(args.model)
    size = args.sequence_parallel_size
    if setup.total_gpus % size or model.num_heads % size:
        raise SystemExit(f"dpo-ds plan: --sequence_parallel_size {size} must divide the {setup.total_gpus} GPUs and "
                         f"the model's {model.num_heads} attention heads")
    result = plan(model, setup)
    fit = smallest_fit(model, setup, args.max_nodes)
    longest = longest_seq_len(model, setup)
    if not args.json:
        emit(render(result, fit, args.max_nodes, longest, args.gpu, args.mfu))
        return 0
    smallest = fit and {"nodes": fit.setup.nodes, "offload_optimizer": fit.setup.offload_optimizer,
                        "offload_params": fit.setup.offload_params, "micro_batch_size": fit.setup.micro_batch_size,
                        "gpu_gib_per_gpu": round(fit.gpu_bytes / GIB, 3),
                        "cpu_gib_per_node": round(fit.cpu_bytes_per_node / GIB, 3), "train_flags": train_flags(fit)}
    flops = setup_flops(model, setup)
    projected = (Projection(flops, setup.total_gpus, args.gpu.peak_tflops, args.mfu).to_dict()
                 if setup.precision == "bf16" else None)
    emit(json.dumps({**result.to_dict(), "smallest_fit": smallest, "longest_seq_len": longest,
                     "flops": {"tokens": flops.tokens, "terms": dict(flops.terms), "dense": flops.dense,
                               "attention": flops.attention, "total": flops.total,
                               "per_gpu": flops.total / setup.total_gpus},
                     "projection": projected and {"gpu": args.gpu.name, **projected,
                                                  "assumption": _assumption(args.mfu)}},
                    indent=2))
    return 0
