"""`dpo-ds bench`: time the real DPO training step on a model built from a config, with synthetic pairs.

The step is the trainer's own (same engines, sampler, collation, log-probs, loss, DeepSpeed step); only the
data is synthetic (random token ids with a chosen length distribution) and the model is random-init from a
preset or config.json (written once to <output_dir>/bench_model, no download). After --warmup steps it
times --steps steps and reports: step time (median, min, max over steps, slowest rank), real tokens/s
(non-padding tokens of all ranks), token occupancy (real / processed tokens), achieved TFLOP/s and MFU on
the 8*N*tokens basis plus causal attention (6*N without a live reference; LoRA: 6*N and 4*N, the frozen
base has no weight gradients), peak memory (GPU allocator, or
process RSS on CPU), and the split of the step into reference forward / policy forward / backward /
optimizer. Every train field (`--micro_batch_size`, `--precision`, `--precompute_ref`, `--group_by_length`,
`--max_tokens_per_micro_batch`, `--deepspeed_config`, ...) works as in `dpo-ds train`. Runs single-process
or under any launcher.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpo_ds.cli import emit
from dpo_ds.config import ConfigError, add_config_arguments, config_from_args, uses_lora, uses_reference
from dpo_ds.data import PairLocations, PairSampler, TokenizedPairs
from launcher.dist import all_reduce, on_rank0

HELP = __doc__
# Dense bf16 peak TFLOP/s per device, for MFU when --peak_tflops is not given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Preset (see `dpo-ds plan --help`), config.json or model dir.")
    parser.add_argument("--lengths", default="fixed:512",
                        help="Tokens per sequence (prompt + completion): fixed:T, or lognormal:MEDIAN,SIGMA "
                             "(like chat data), clipped to [16, max_length]. Default fixed:512.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (default 2).")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps (default 5).")
    parser.add_argument("--peak_tflops", type=float,
                        help=f"Peak TFLOP/s of one device for MFU (default: looked up for {', '.join(PEAK_TFLOPS)}).")
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
                          pair_ids=PairLocations("synthetic", "jsonl", np.arange(n)), **columns)


def _model_dir(model: str, output_dir: Path) -> tuple[Path, object]:
    """A random-init Hugging Face directory for `model` (rank 0 writes it once; the others wait)."""
    from dpo_ds.plan import load_model_config

    config, name = load_model_config(model)
    target = output_dir / "bench_model" / name

    def build() -> None:
        if (target / "config.json").is_file():
            return
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        tmp = target.with_name(target.name + ".tmp")
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tmp.rename(target)

    on_rank0(f"writing the random-init {model} model to {target}", build)
    return target, config


def _peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def run(args: argparse.Namespace) -> int:
    from deepspeed.accelerator import get_accelerator
    from launcher.dist import check_shared_dirs, init_distributed

    from dpo_ds.engines import fused_head
    from dpo_ds.metrics import PairStats, SectionTimer, max_over_ranks, peak_memory_gib
    from dpo_ds.plan import shape_from_config
    from dpo_ds.trainer import build_run, cache_dir_of, pair_step, setup_logging

    args.model_name_or_path = args.model  # validated below, replaced by the written directory
    args.train_file = "synthetic"
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"dpo-ds bench: error: {err}", file=sys.stderr)
        return 2
    env = init_distributed(timeout_s=cfg.dist_timeout_s)
    setup_logging(env.rank)
    check_shared_dirs({"output_dir": cfg.output_dir, "cache_dir": cache_dir_of(cfg)})
    model_dir, config = _model_dir(args.model, Path(cfg.output_dir))
    cfg.model_name_or_path, cfg.ref_model_name_or_path = str(model_dir), None
    shape = shape_from_config(config, args.model)
    total_steps = args.warmup + args.steps
    # Enough pairs for every step to see new ones, generous when a token budget packs micro-batches.
    pairs_needed = total_steps * cfg.global_batch_pairs(env.world_size)
    if cfg.max_tokens_per_micro_batch:
        pairs_needed *= max(1, cfg.max_tokens_per_micro_batch // (2 * 16 * cfg.micro_batch_size))
    pairs = synthetic_pairs(pairs_needed, args.lengths, cfg.max_length, shape.vocab_size, cfg.seed)
    sampler = PairSampler.for_config(cfg, pairs, env.world_size)
    total_steps = min(total_steps, sampler.steps_per_epoch)
    run = build_run(cfg, env.rank, env.world_size, total_steps, pad_id=0, datasets=[pairs])

    timer = SectionTimer()
    times, real_tokens, processed_tokens, attention_flops = [], 0, 0, 0.0
    for step in range(total_steps):
        timed = step >= args.warmup
        run.timer = timer if timed else run.timer
        stats = PairStats()
        started = time.perf_counter()
        micro_batches = sampler.micro_batches(step, env.rank)
        scale = sampler.loss_scale(step) if cfg.max_tokens_per_micro_batch else None
        for indices in micro_batches:
            pair_step(run, pairs, indices, stats, train=True, loss_scale=scale)
        get_accelerator().synchronize()
        if timed:
            times.append(time.perf_counter() - started)
            real_tokens += stats.total("real_tokens")
            processed_tokens += stats.total("padded_tokens")
            for indices in micro_batches:
                for i in indices:
                    for completion in (pairs.chosen[i], pairs.rejected[i]):
                        attention_flops += (len(pairs.prompt[i]) + len(completion)) ** 2
    step_times = torch.tensor(times, dtype=torch.float64)
    totals = torch.tensor([real_tokens, processed_tokens, attention_flops], dtype=torch.float64)
    split = torch.tensor([timer.totals.get(k, 0.0) for k in ("reference_forward", "policy_forward", "backward", "optimizer")],
                         dtype=torch.float64)
    step_times = all_reduce(step_times, "max")  # a step takes as long as its slowest rank
    totals = all_reduce(totals)
    split = all_reduce(split, "max")
    live_reference = uses_reference(cfg) and not cfg.precompute_ref
    # LoRA: the frozen base needs no weight gradients, so the policy's backward is 2N, not 4N (see dpo-ds plan)
    factor = (4 if uses_lora(cfg) else 6) + (2 if live_reference else 0)
    # 2*N FLOPs per token and pass; causal attention 2 * layers * q_dim * len^2 per sequence and pass.
    flops = factor * shape.active_params * float(totals[0]) + factor * shape.num_layers * shape.q_dim * float(totals[2])
    elapsed = float(step_times.sum())
    achieved = flops / elapsed / 1e12
    peak = _peak_tflops(args.peak_tflops)
    report = {
        "model": args.model, "params": shape.params, "active_params": shape.active_params,
        "world_size": env.world_size, "precision": cfg.precision,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "micro_batch_size": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_tokens_per_micro_batch": cfg.max_tokens_per_micro_batch, "group_by_length": cfg.group_by_length,
        "padding_free": cfg.padding_free, "attention": run.policy.module.config._attn_implementation,
        "fused_lm_head": fused_head(run.policy.module) is not None if cfg.fused_lm_head else False,
        "lengths": args.lengths, "reference": "live" if live_reference else "cached" if cfg.precompute_ref else "none",
        "gradient_checkpointing": cfg.gradient_checkpointing, "lora_r": cfg.lora_r,
        "lora_quantize": cfg.lora_quantize, "warmup_steps": args.warmup, "timed_steps": len(times),
        "step_time_s": {"median": statistics.median(step_times.tolist()), "min": float(step_times.min()),
                        "max": float(step_times.max())},
        "tokens_per_s": float(totals[0]) / elapsed,
        "token_occupancy": float(totals[0]) / max(float(totals[1]), 1.0),
        "tflops_per_s": achieved, "tflops_per_s_per_device": achieved / env.world_size,
        "mfu": achieved / (peak * env.world_size) if peak else None, "peak_tflops_per_device": peak,
        "peak_memory_gib": max_over_ranks(peak_memory_gib()),
        "split_s_per_step": dict(zip(("reference_forward", "policy_forward", "backward", "optimizer"),
                                     (v / max(len(times), 1) for v in split.tolist()))),
    }
    if env.rank == 0:
        emit(json.dumps(report) if args.json else _table(report))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _table(r: dict) -> str:
    t = r["step_time_s"]
    lines = [
        f"model        {r['model']} ({r['params'] / 1e6:.1f} M params), {r['world_size']} rank(s), {r['precision']}, "
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
