"""`dpo-ds bench`: time the real DPO training step on a model built from a config, with synthetic pairs.

The step is the trainer's own (same engines, sampler, collation, log-probs, loss, DeepSpeed step); only the
data is synthetic (random token ids with a chosen length distribution) and the model is random-init from a
preset or config.json (written once to <output_dir>/bench_model, no download). After --warmup steps it
times --steps steps and reports: step time (median, min, max over steps, slowest rank), real tokens/s
(non-padding tokens of all ranks), token occupancy (real / processed tokens), achieved TFLOP/s and MFU from
`dpo-ds plan`'s FLOP count of the real tokens (dpo_ds.plan.compute.step_flops: 6*N per token for the policy,
4*N with LoRA, + 2*N for the gradient-checkpoint recompute, + 2*N for a live reference's forward, + causal
attention) and its table of dense bf16 peaks, peak memory (GPU allocator, or process RSS on CPU), and the split of the step into reference forward / policy forward / backward /
optimizer. Every train field (`--micro_batch_size`, `--precision`, `--precompute_ref`, `--group_by_length`,
`--max_tokens_per_micro_batch`, `--deepspeed_config`, `--sequence_parallel_size`, ...) works as in `dpo-ds train`.
Runs single-process or under any launcher.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dpo_ds.config import ConfigError, add_config_arguments, config_from_args, uses_lora, uses_reference
from dpo_ds.console import emit, setup_logging
from dpo_ds.data import PairSampler, RowLocations, TokenizedPairs, for_unit
from dpo_ds.losses import loss_unit
from dpo_ds.metrics import SectionTimer, max_over_ranks, peak_memory_gib
from dpo_ds.parallel import Parallel
from dpo_ds.plan import GPUS, gpu_of_device, model_config_and_name, shape_from_config, step_flops
from dpo_ds.prepare import cache_dir_of
from launcher.dist import all_reduce

HELP = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Preset (see `dpo-ds plan --help`), config.json or model dir.")
    parser.add_argument("--lengths", default="fixed:512",
                        help="Tokens per sequence (prompt + completion): fixed:T, or lognormal:MEDIAN,SIGMA "
                             "(like chat data), clipped to [16, max_length]. Default fixed:512.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (default 2).")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps (default 5).")
    parser.add_argument("--peak_tflops", type=float,
                        help=f"Peak TFLOP/s of one device for MFU (default: dpo-ds plan's dense bf16 peak of the "
                             f"device: {', '.join(GPUS)}).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    add_config_arguments(parser)


def synthetic_pairs(n: int, spec: str, max_length: int, vocab_size: int, seed: int) -> TokenizedPairs:
    """n pairs of random ids; each sequence's total length from `spec`, its prompt 25-50% of the shorter one."""
    g = torch.Generator().manual_seed(seed)
    kind, _, value = spec.partition(":")
    if kind == "fixed":
        totals = torch.full((n, 2), float(value))
    elif kind == "lognormal":
        median, sigma = (float(v) for v in value.split(","))
        totals = torch.exp(math.log(median) + sigma * torch.randn(n, 2, generator=g))
    else:
        raise ConfigError(f"--lengths: expected fixed:T or lognormal:MEDIAN,SIGMA, got {spec!r}")
    totals = totals.round().clamp(16, max_length).long()
    columns: dict[str, list[list[int]]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        shorter = int(totals[i].min())
        prompt_len = int(shorter * (0.25 + 0.25 * torch.rand(1, generator=g)))

        def ids(k: int) -> list[int]:
            return torch.randint(3, vocab_size, (k,), generator=g).tolist()

        columns["prompt"].append(ids(prompt_len))
        columns["chosen"].append(ids(int(totals[i, 0]) - prompt_len))
        columns["rejected"].append(ids(int(totals[i, 1]) - prompt_len))
    return TokenizedPairs(fingerprint=f"synthetic-{spec}-{n}-{max_length}-{vocab_size}-{seed}",
                          pair_ids=RowLocations("synthetic", "jsonl", np.arange(n)), **columns)


def _model_dir(model: str, output_dir: Path, parallel: Parallel) -> tuple[Path, object]:
    """A random-init Hugging Face directory for `model` (rank 0 writes it once; the others wait)."""
    config, name = model_config_and_name(model)
    target = output_dir / "bench_model" / name

    def build() -> None:
        if (target / "config.json").is_file():
            return
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        tmp = target.with_name(target.name + ".tmp")
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tmp.rename(target)

    parallel.on_rank0(f"writing the random-init {model} model to {target}", build)
    return target, config


def _peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    gpu = gpu_of_device(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return gpu and gpu.peak_tflops


SECTIONS = ("reference_forward", "policy_forward", "backward", "optimizer")


def _time_steps(ctx, train_step, sampler: PairSampler, pairs: TokenizedPairs, warmup: int,
                total_steps: int) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Run the trainer's own steps (`train_step`, step.train_step); time those after `warmup`. Returns, over
    all ranks: each timed step's time (its slowest rank), the timed steps' [real tokens, processed tokens, sum of
    squared sequence lengths] (for the FLOP model), and the slowest rank's total time in each of SECTIONS."""
    from deepspeed.accelerator import get_accelerator  # heavy, as in run: not imported for --help

    timer = SectionTimer()
    times, real_tokens, processed_tokens, squared_lengths = [], 0, 0, 0.0
    for step in range(total_steps):
        timed = step >= warmup
        ctx.timer = timer if timed else ctx.timer
        started = time.perf_counter()
        result = train_step(ctx, sampler, pairs, step)
        get_accelerator().synchronize()
        if timed:
            times.append(time.perf_counter() - started)
            real_tokens += result.stats.total("real_tokens")
            processed_tokens += result.stats.total("padded_tokens")
            for indices in result.micro_batches:
                for i in indices:
                    for slot in range(pairs.sequences_per_example()):
                        prompt, completion = pairs.sequence(slot, i)
                        squared_lengths += (len(prompt) + len(completion)) ** 2
    step_times = all_reduce(torch.tensor(times, dtype=torch.float64), "max")  # a step takes as long as its slowest rank
    # the S ranks of a sequence-parallel group share each micro-batch: count it once
    totals = all_reduce(torch.tensor([real_tokens, processed_tokens, squared_lengths], dtype=torch.float64)
                        ) / ctx.parallel.sequence_parallel_size
    split = all_reduce(torch.tensor([timer.totals.get(k, 0.0) for k in SECTIONS], dtype=torch.float64), "max")
    return step_times.tolist(), totals, split


def run(args: argparse.Namespace) -> int:
    from dpo_ds.engines import resolve_padding_free  # heavy (DeepSpeed): imported when the command runs
    from dpo_ds.step import build_step_context, train_step

    # the model is a preset or a config until _model_dir writes it; the pairs are made here
    cfg = config_from_args(args, fixed={"model_name_or_path": args.model, "train_file": "synthetic"},
                           unchecked_paths=("model_name_or_path", "train_file"))
    parallel = Parallel.init(timeout_s=cfg.dist_timeout_s, sequence_parallel_size=cfg.sequence_parallel_size)
    setup_logging(parallel.rank)
    parallel.check_shared_dirs({"output_dir": cfg.output_dir, "cache_dir": cache_dir_of(cfg)})
    model_dir, config = _model_dir(args.model, Path(cfg.output_dir), parallel)
    cfg.model_name_or_path, cfg.ref_model_name_or_path = str(model_dir), None
    resolve_padding_free(cfg)
    if cfg.sequence_parallel_size > 1:
        from dpo_ds.trainer import check_sequence_parallel

        check_sequence_parallel(cfg, parallel.world_size)
    shape = shape_from_config(config, args.model)
    total_steps = args.warmup + args.steps
    # Enough pairs for every step to see new ones, generous when a token budget packs micro-batches.
    pairs_needed = total_steps * cfg.global_batch_pairs(parallel.data_parallel_size)
    if cfg.max_tokens_per_micro_batch:
        pairs_needed *= max(1, cfg.max_tokens_per_micro_batch // (2 * 16 * cfg.micro_batch_size))
    # the examples the loss trains on (KTO: each synthetic pair split into a desirable and an undesirable one)
    pairs = for_unit(synthetic_pairs(pairs_needed, args.lengths, cfg.max_length, shape.vocab_size, cfg.seed),
                     loss_unit(cfg.loss_type), "synthetic", cfg.loss_type)
    sampler = PairSampler.for_config(cfg, pairs, parallel.data_parallel_size)
    total_steps = min(total_steps, sampler.steps_per_epoch)
    ctx = build_step_context(cfg, parallel, total_steps, pad_id=0, datasets=[pairs])

    times, totals, split = _time_steps(ctx, train_step, sampler, pairs, args.warmup, total_steps)
    step_times = torch.tensor(times, dtype=torch.float64)
    live_reference = uses_reference(cfg) and not cfg.precompute_ref
    flops = step_flops(shape, float(totals[0]), float(totals[2]), lora=uses_lora(cfg),  # plan's count
                       recompute=ctx.gradient_checkpointing, live_reference=live_reference).total
    elapsed = float(step_times.sum())
    achieved = flops / elapsed / 1e12
    peak = _peak_tflops(args.peak_tflops)
    report = {
        "model": args.model, "params": shape.params, "active_params": shape.active_params,
        "world_size": parallel.world_size, "sequence_parallel_size": cfg.sequence_parallel_size,
        "precision": cfg.precision,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "micro_batch_size": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_tokens_per_micro_batch": cfg.max_tokens_per_micro_batch, "group_by_length": cfg.group_by_length,
        "padding_free": cfg.padding_free, "attention": ctx.policy.module.config._attn_implementation,
        "fused_lm_head": ctx.policy_head is not None,
        "lengths": args.lengths, "reference": "live" if live_reference else "cached" if cfg.precompute_ref else "none",
        "gradient_checkpointing": ctx.gradient_checkpointing, "lora_r": cfg.lora_r,
        "lora_quantize": cfg.lora_quantize, "warmup_steps": args.warmup, "timed_steps": len(times),
        "step_time_s": {"median": statistics.median(step_times.tolist()), "min": float(step_times.min()),
                        "max": float(step_times.max())},
        "tokens_per_s": float(totals[0]) / elapsed,
        "token_occupancy": float(totals[0]) / max(float(totals[1]), 1.0),
        "flops_per_step": flops / max(len(times), 1), "tflops_per_s": achieved, "tflops_per_s_per_device": achieved / parallel.world_size,
        "mfu": achieved / (peak * parallel.world_size) if peak else None, "peak_tflops_per_device": peak,
        "peak_memory_gib": max_over_ranks(peak_memory_gib()),
        "split_s_per_step": dict(zip(SECTIONS, (v / max(len(times), 1) for v in split.tolist()))),
    }
    if parallel.is_main:
        emit(json.dumps(report) if args.json else _table(report))
    return 0


def _table(r: dict) -> str:
    t = r["step_time_s"]
    lines = [
        f"model        {r['model']} ({r['params'] / 1e6:.1f} M params), {r['world_size']} rank(s)"
        + (f" (sequence parallel {r['sequence_parallel_size']})" if r["sequence_parallel_size"] > 1 else "")
        + f", {r['precision']}, "
        f"{r['device']}, reference {r['reference']}" + (f", LoRA r={r['lora_r']}" if r["lora_r"] else "")
        + (f" over an {r['lora_quantize']} base (QLoRA)" if r["lora_quantize"] else ""),
        f"batch        {r['micro_batch_size']} pairs x {r['gradient_accumulation_steps']} accumulation per rank, "
        f"lengths {r['lengths']}, token budget {r['max_tokens_per_micro_batch']}, grouped {r['group_by_length']}",
        f"scoring      padding-free {r['padding_free']}, attention {r['attention']}, fused lm_head {r['fused_lm_head']}",
        f"step time    median {t['median']:.3f} s (min {t['min']:.3f}, max {t['max']:.3f}) over {r['timed_steps']} steps",
        f"throughput   {r['tokens_per_s']:.0f} real tokens/s, occupancy {r['token_occupancy']:.1%}, "
        f"{r['tflops_per_s']:.3f} TFLOP/s" + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""),
        f"memory       peak {r['peak_memory_gib']:.2f} GiB",
        "split        " + ", ".join(f"{k} {v:.3f} s" for k, v in r["split_s_per_step"].items()),
    ]
    return "\n".join(lines)
