"""`dpo-ds train`: the DPO recipe.

    for each optimizer step k:                       (pairs [k*G, (k+1)*G) of the epoch order)
        for each micro-batch of B pairs on this rank:
            batch     = [prompt+chosen ; prompt+rejected]           one 2B-row batch
            ref_logps = reference.logps(batch)                       frozen, no grad
            logps     = sequence_logps(policy(batch))                 one forward, checkpointed
            loss      = LOSSES[loss_type](logps, ref_logps).mean()
            policy.backward(loss); policy.step()                     DeepSpeed steps at the GA boundary
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dpo_ds.config import ConfigError, TrainConfig, add_config_arguments, config_from_args, to_dict, uses_reference
from dpo_ds.data import DataError, PairSampler, TokenizedPairs, collate, load_pairs
from dpo_ds.losses import LossParams, PairLogps, compute_loss
from dpo_ds.metrics import MetricsWriter, PairStats, max_over_ranks, peak_memory_gib

HELP = __doc__
logger = logging.getLogger("dpo_ds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def setup_logging(rank: int) -> None:
    # DeepSpeed 0.19 calls a torch collective that torch 2.13 renamed; the warning is theirs, once per call.
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Run:
    """Everything a step needs, built once."""
    cfg: TrainConfig
    rank: int
    world_size: int
    tokenizer: object
    policy: object
    reference: object
    loss_params: LossParams
    pad_id: int


def split_pairs(logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor) -> PairLogps:
    """Rows [0, B) of the 2B batch are chosen, rows [B, 2B) rejected."""
    b = logps.shape[0] // 2
    ref_logps = ref_logps.to(logps.device)
    return PairLogps(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], tokens[:b], tokens[b:])


def pair_step(run: Run, pairs: TokenizedPairs, indices: list[int], stats: PairStats | None, train: bool):
    """Loss of one micro-batch of pairs (backward + step when training); adds its numbers to `stats`."""
    from dpo_ds.engines import forward_logps

    batch = collate(pairs, indices, run.pad_id)
    ref_logps = run.reference.logps(batch, indices)
    with torch.set_grad_enabled(train):
        logps, tokens = forward_logps(run.policy, batch, run.cfg.logprob_chunk_size)
        lp = split_pairs(logps, tokens, ref_logps)
        out = compute_loss(run.cfg.loss_type, lp, run.loss_params)
        loss = out.losses.mean()
    if train:
        run.policy.backward(loss)
        run.policy.step()
    if stats is not None:
        stats.add_pairs(lp, out, real_tokens=int(batch["attention_mask"].sum()),
                        padded_tokens=batch["input_ids"].numel())
    return lp, out


@torch.no_grad()
def evaluate(run: Run, pairs: TokenizedPairs) -> dict[str, float]:
    """Preference metrics over every pair of `pairs`, split over ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank with no
    pairs left repeats pair 0 and does not count it.
    """
    run.policy.eval()
    stats = PairStats()
    b, w = run.cfg.micro_batch_size, run.world_size
    for start in range(0, len(pairs), b * w):
        mine = list(range(start + run.rank * b, min(start + (run.rank + 1) * b, len(pairs))))
        lp, out = pair_step(run, pairs, mine or [0], None, train=False)
        if mine:
            stats.add_pairs(lp, out, 0, 0)
    run.policy.train()
    metrics = stats.reduce()
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected")
    return {f"eval/{k}": metrics[k] for k in keys}


def build_run(cfg: TrainConfig, rank: int, world_size: int, total_steps: int, tokenizer) -> Run:
    from dpo_ds.engines import (LiveReference, NoReference, build_inference_engine, build_policy_engine,
                                load_model_config, model_dtype, resolve_policy_config, resolve_reference_config)

    hidden = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code).hidden_size
    policy = build_policy_engine(cfg, resolve_policy_config(cfg, world_size, hidden), total_steps)
    if uses_reference(cfg):
        ref_path = cfg.ref_model_name_or_path or cfg.model_name_or_path
        ref_engine = build_inference_engine(ref_path, resolve_reference_config(cfg, hidden), model_dtype(cfg),
                                            cfg.trust_remote_code)
        reference = LiveReference(ref_engine, cfg.logprob_chunk_size)
    else:
        reference = NoReference()
    params = LossParams(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                        rpo_alpha=cfg.rpo_alpha, length_normalize=cfg.length_normalize)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(cfg, rank, world_size, tokenizer, policy, reference, params, pad_id)


@dataclass
class TrainResult:
    run: Run
    metrics: dict[str, float]  # the last logged values (with eval/ keys when eval_file is set)


def train(cfg: TrainConfig) -> TrainResult:
    from launcher.dist import init_distributed
    from transformers import AutoTokenizer

    env = init_distributed(timeout_s=cfg.dist_timeout_s)
    rank, world_size = env.rank, env.world_size
    setup_logging(rank)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    data_args = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                     skip_bad_rows=cfg.skip_bad_rows, cache_dir=str(out_dir / "caches"), rank=rank, barrier=_barrier)
    train_pairs, _ = load_pairs(cfg.train_file, tokenizer, **data_args)
    eval_pairs = load_pairs(cfg.eval_file, tokenizer, **data_args)[0] if cfg.eval_file else None

    sampler = PairSampler([train_pairs.length(i) for i in range(len(train_pairs))], cfg.micro_batch_size,
                          cfg.gradient_accumulation_steps, world_size, cfg.shuffle, cfg.group_by_length, cfg.seed)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{cfg.train_file}: {len(train_pairs)} usable pairs, fewer than one optimizer step's "
                        f"{sampler.pairs_per_step} (micro_batch_size x gradient_accumulation_steps x {world_size} ranks)")
    total_steps = cfg.max_steps or sampler.steps_per_epoch * cfg.num_epochs
    if rank == 0:
        logger.info("%d pairs, %d per step on %d ranks, %d steps", len(train_pairs), sampler.pairs_per_step,
                    world_size, total_steps)

    run = build_run(cfg, rank, world_size, total_steps, tokenizer)
    writer = MetricsWriter(cfg.output_dir, enabled=rank == 0)
    progress = _progress(total_steps, rank)
    stats = PairStats()
    last: dict[str, float] = {}
    for step in range(total_steps):
        started = time.perf_counter()
        lr = run.policy.get_lr()[0]  # the rate this step uses (the scheduler advances inside the step)
        for indices in sampler.micro_batches(step, rank):
            pair_step(run, train_pairs, indices, stats, train=True)
        stats.add_step_time(time.perf_counter() - started)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == total_steps:
            last = stats.reduce()
            last.update({"grad_norm": _grad_norm(run.policy), "lr": lr,
                         "memory/peak_gib": max_over_ranks(peak_memory_gib()), "epoch": step / sampler.steps_per_epoch})
            writer.write(done, last)
            stats = PairStats()
        if eval_pairs is not None and (done == total_steps or (cfg.eval_steps and done % cfg.eval_steps == 0)):
            eval_metrics = evaluate(run, eval_pairs)
            writer.write(done, eval_metrics)
            last.update(eval_metrics)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
    if progress is not None:
        progress.close()

    from dpo_ds.convert import export_engine
    export_engine(run.policy, str(out_dir / "final"), tokenizer=tokenizer, dtype=None)
    writer.close()
    if rank == 0:
        logger.info("final model written to %s", out_dir / "final")
    return TrainResult(run, last)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _progress(total: int, rank: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="dpo", dynamic_ncols=True, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        train(cfg)
    except (ConfigError, DataError) as err:
        print(f"dpo-ds train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
