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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dpo_ds import checkpoint as ckpt
from dpo_ds.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    check_paths,
    config_from_args,
    to_dict,
    uses_lora,
    uses_reference,
)
from dpo_ds.data import DataError, PairSampler, TokenizedPairs, collate, rank_shares
from dpo_ds.families import check_model_family
from dpo_ds.loading import LoadError
from dpo_ds.losses import LossParams, PairLogps, compute_loss
from dpo_ds.metrics import MetricsWriter, PairStats, max_over_ranks, peak_memory_gib, untimed
from dpo_ds.prepare import cache_dir_of, load_config_data
from dpo_ds.reference_check import check_reference_compatible
from launcher.dist import all_reduce, barrier, check_shared_dirs, gather_objects

HELP = __doc__
logger = logging.getLogger("dpo_ds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class Run:
    """Everything a step needs, built once."""
    cfg: TrainConfig
    rank: int
    world_size: int
    policy: object           # the DeepSpeed engine being trained (or scored, in `dpo-ds eval`)
    reference: object        # a reference source (dpo_ds.reference)
    loss_params: LossParams
    pad_id: int
    timer: object = untimed  # SectionTimer in `dpo-ds bench`
    aux_losses: list = field(default_factory=list)  # router load-balancing losses of training micro-batches since the last log


def split_pairs(logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor) -> PairLogps:
    """Rows [0, B) of the 2B batch are chosen, rows [B, 2B) rejected."""
    from dpo_ds.engines import to_device

    b = logps.shape[0] // 2
    ref_logps = to_device(ref_logps, logps.device)
    return PairLogps(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], tokens[:b], tokens[b:])


def pair_step(run: Run, pairs: TokenizedPairs, indices: list[int], stats: PairStats | None, train: bool,
              loss_scale: float | None = None):
    """Loss of one micro-batch of pairs (backward + step when training); adds its numbers to `stats`.

    The loss is the pairs' mean, or their sum x `loss_scale` (PairSampler.loss_scale) when micro-batches hold
    different numbers of pairs."""
    from dpo_ds.engines import forward_logps, forward_logps_and_aux

    batch = collate(pairs, indices, run.pad_id, packed=run.cfg.padding_free)
    with run.timer("reference_forward"):
        ref_logps = run.reference.logps(batch, pairs, indices)
    with run.timer("policy_forward"), torch.set_grad_enabled(train):
        aux_coef = run.cfg.router_aux_loss_coef if train else 0.0  # evaluation scores preferences only
        if aux_coef > 0:
            logps, tokens, aux = forward_logps_and_aux(run.policy, batch, run.cfg.logprob_chunk_size,
                                                       run.cfg.fused_lm_head, router_aux=True)
        else:
            logps, tokens = forward_logps(run.policy, batch, run.cfg.logprob_chunk_size, run.cfg.fused_lm_head)
        lp = split_pairs(logps, tokens, ref_logps)
        out = compute_loss(run.cfg.loss_type, lp, run.loss_params)
        loss = out.losses.mean() if loss_scale is None else out.losses.sum() * loss_scale
        if aux_coef > 0:  # as TRL: the micro-batch's load-balancing loss, weighted, on top of the preference loss
            loss = loss + aux_coef * aux.to(loss.dtype)
            run.aux_losses.append(aux.detach().float())  # read at the log line: no device sync per micro-step
    if train:
        with run.timer("backward"):
            run.policy.backward(loss)
        with run.timer("optimizer"):
            run.policy.step()
    if stats is not None:
        processed = batch["input_ids"].numel()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else processed
        stats.add_pairs(lp, out, real_tokens=real, padded_tokens=processed)
    return lp, out


@torch.no_grad()
def evaluate(run: Run, pairs: TokenizedPairs) -> tuple[dict[str, float], list[dict]]:
    """Preference metrics over every pair of `pairs`, split over ranks (data.rank_shares), and per-pair
    records (rank 0)."""
    stats = PairStats()
    records = []
    for mine in rank_shares(len(pairs), run.cfg.micro_batch_size, run.rank, run.world_size):
        lp, out = pair_step(run, pairs, mine or [0], None, train=False)
        if mine:
            stats.add_pairs(lp, out, 0, 0)
            records += _pair_records(pairs, mine, lp, out)
    metrics = stats.reduce()
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected")
    records = [r for part in gather_objects(records) for r in part]
    records.sort(key=lambda r: r["index"])
    return {f"eval/{k}": metrics[k] for k in keys}, records


def _pair_records(pairs: TokenizedPairs, indices: list[int], lp: PairLogps, out) -> list[dict]:
    rows = []
    for j, i in enumerate(indices):
        rows.append({"index": i, "pair_id": pairs.pair_ids[i],
                     "policy_chosen_logp": float(lp.policy_chosen[j]), "policy_rejected_logp": float(lp.policy_rejected[j]),
                     "ref_chosen_logp": float(lp.ref_chosen[j]), "ref_rejected_logp": float(lp.ref_rejected[j]),
                     "chosen_tokens": int(lp.chosen_tokens[j]), "rejected_tokens": int(lp.rejected_tokens[j]),
                     "chosen_reward": float(out.chosen_rewards[j]), "rejected_reward": float(out.rejected_rewards[j]),
                     "margin": float(out.chosen_rewards[j] - out.rejected_rewards[j]),
                     "correct": bool(out.chosen_rewards[j] > out.rejected_rewards[j]), "loss": float(out.losses[j])})
    return rows


def loss_params(cfg: TrainConfig) -> LossParams:
    return LossParams(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                      rpo_alpha=cfg.rpo_alpha, length_normalize=cfg.length_normalize)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_run(cfg: TrainConfig, rank: int, world_size: int, total_steps: int, pad_id: int,
              datasets: list[TokenizedPairs], load_universal: bool = False) -> Run:
    """The reference source first (with precompute_ref its engine is gone before the policy exists), then the
    policy engine: the same order on every rank, as ZeRO-3 requires. With LoRA the policy comes first: it is
    also the reference."""
    from dpo_ds.engines import attention_kernel, build_policy_engine, load_model_config, resolve_policy_config
    from dpo_ds.reference import build_reference

    hidden = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code).hidden_size
    kernel = attention_kernel(cfg)
    if cfg.padding_free and torch.cuda.is_available() and not (kernel or "").startswith("flash_attention"):
        logger.warning("padding_free with attention %s: a packed micro-batch is attended through a block-diagonal "
                       "mask, quadratic in its total tokens; install flash-attn (attn_implementation auto) for "
                       "varlen attention", kernel or "(model default)")
    ds_config = resolve_policy_config(cfg, world_size, hidden)
    if load_universal:  # resuming a checkpoint saved by another world size
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    if uses_lora(cfg):  # the reference is the policy engine itself (adapter off): no second model
        policy = build_policy_engine(cfg, ds_config, total_steps)
        reference = build_reference(cfg, hidden, datasets, cache_dir_of(cfg), pad_id, rank, world_size, policy)
    else:
        reference = build_reference(cfg, hidden, datasets, cache_dir_of(cfg), pad_id, rank, world_size)
        policy = build_policy_engine(cfg, ds_config, total_steps)
    return Run(cfg, rank, world_size, policy, reference, loss_params(cfg), pad_id)


@dataclass
class TrainResult:
    run: Run
    metrics: dict[str, float]  # the last logged values (with eval/ keys when eval_file is set)


class TrainingStopped(RuntimeError):
    """A guard stopped the run (NaN/Inf steps, max_kl); the message says which and where."""


class Preempted(Exception):
    """A stop signal arrived; the checkpoint is written and the process should exit with EXIT_PREEMPTED."""


def train(cfg: TrainConfig) -> TrainResult:
    from transformers import AutoTokenizer

    from launcher.dist import init_distributed

    env = init_distributed(timeout_s=cfg.dist_timeout_s)
    rank, world_size = env.rank, env.world_size
    setup_logging(rank)
    stop_signal = ckpt.StopSignal()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    ckpt.refuse_to_overwrite(cfg.output_dir, cfg.resume_from)
    check_shared_dirs({"output_dir": str(out_dir), "cache_dir": cache_dir_of(cfg)})

    check_model_family(cfg)  # a model that cannot work is refused before anything is loaded
    if cfg.ref_model_name_or_path and uses_reference(cfg):  # the seed's rule: one tokenization for both models
        check_reference_compatible(cfg.model_name_or_path, cfg.ref_model_name_or_path, cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    train_pairs, data_fingerprint, eval_pairs = load_config_data(cfg, tokenizer, rank, barrier)

    sampler = PairSampler.for_config(cfg, train_pairs, world_size)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{cfg.train_file}: {len(train_pairs)} usable pairs, fewer than one optimizer step's "
                        f"{sampler.pairs_per_step} (micro_batch_size x gradient_accumulation_steps x {world_size} ranks)")
    total_steps = cfg.max_steps or sampler.total_steps(cfg.num_epochs)
    if rank == 0:
        logger.info("%d pairs, %d per step on %d ranks, %d steps", len(train_pairs), sampler.pairs_per_step,
                    world_size, total_steps)

    def trainer_state(step: int) -> ckpt.TrainerState:
        return ckpt.TrainerState(step=step, sampler=sampler.state(step), world_size=world_size,
                                 pairs_per_step=sampler.pairs_per_step, data_fingerprint=data_fingerprint,
                                 model_fingerprint=ckpt.model_fingerprint(cfg.model_name_or_path), config=to_dict(cfg))

    resume_dir, saved = ckpt.resume_point(cfg.output_dir, cfg.resume_from, trainer_state(0),
                                          cfg.resume_ignore_mismatch)
    if rank == 0:  # only once every check has passed: a refused start leaves the run folder as it was
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    run = build_run(cfg, rank, world_size, total_steps, pad_id_of(tokenizer),
                    [p for p in (train_pairs, eval_pairs) if p is not None],
                    load_universal=saved is not None and saved.world_size != world_size)
    start_step = 0
    if saved is not None:
        ckpt.load_checkpoint(run.policy, resume_dir, saved, world_size)
        start_step = saved.step
        if rank == 0:
            logger.info("resumed from step %d (%s)", start_step, resume_dir)
    writer = MetricsWriter(cfg.output_dir, enabled=rank == 0, after_step=start_step)
    progress = _progress(total_steps, start_step, rank)
    window, skipped, bad_in_a_row = PairStats(), 0, 0
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        lr = run.policy.get_lr()[0]  # the rate this step uses (the scheduler advances inside the step)
        step_stats = PairStats()
        micro_batches = sampler.micro_batches(step, rank)
        scale = sampler.loss_scale(step) if cfg.max_tokens_per_micro_batch else None
        for indices in micro_batches:
            pair_step(run, train_pairs, indices, step_stats, train=True, loss_scale=scale)
        step_stats.add_step_time(time.perf_counter() - started)
        done = step + 1
        if step == start_step and rank == 0:
            logger.info("step %d done %.1f s after the process started", done, _seconds_since_process_start())
        if run.policy.was_step_applied():
            window.merge(step_stats)
            bad_in_a_row = 0
        else:  # NaN/Inf gradients: DeepSpeed skipped the update on every rank (non-finite grad norm)
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            _report_bad_step(done, micro_batches, train_pairs, bad_in_a_row, cfg.max_bad_steps, rank)
        if done % cfg.logging_steps == 0 or done == total_steps:
            last = window.reduce()
            if cfg.router_aux_loss_coef > 0:
                last["aux_loss"] = _mean_over_ranks(run.aux_losses)
                run.aux_losses.clear()
            last.update({"grad_norm": _grad_norm(run.policy), "lr": lr, "skipped_steps": skipped,
                         "memory/peak_gib": max_over_ranks(peak_memory_gib()), "epoch": done / sampler.steps_per_epoch})
            writer.write(done, last)
            window = PairStats()
            if _kl_exceeded(cfg, last, done, rank):
                ckpt.save_checkpoint(run.policy, cfg.output_dir, trainer_state(done), cfg.save_total_limit, tokenizer)
                raise TrainingStopped(f"stopped at step {done}: mean KL to the reference exceeded max_kl={cfg.max_kl} "
                                      f"(stop_on_max_kl); checkpoint saved")
        if eval_pairs is not None and (done == total_steps or (cfg.eval_steps and done % cfg.eval_steps == 0)):
            run.policy.eval()
            eval_metrics, _ = evaluate(run, eval_pairs)
            run.policy.train()
            writer.write(done, eval_metrics)
            last.update(eval_metrics)
        if progress is not None:
            progress.update(1)
            if "loss" in last:
                progress.set_postfix(loss=f"{last['loss']:.4f}")
        stop = ckpt.any_rank(stop_signal.received is not None)
        if stop or (cfg.save_steps and done % cfg.save_steps == 0):
            ckpt.save_checkpoint(run.policy, cfg.output_dir, trainer_state(done), cfg.save_total_limit, tokenizer)
        if stop and done < total_steps:
            writer.close()
            raise Preempted(f"stopped by a signal after step {done}; resume with --resume_from auto")
    if progress is not None:
        progress.close()

    if uses_lora(cfg):
        from dpo_ds.engines import model_dtype
        from dpo_ds.lora import export_lora

        export_lora(run.policy, cfg, out_dir, tokenizer, model_dtype(cfg))
    else:
        from dpo_ds.convert import export_engine

        export_engine(run.policy, str(out_dir / "final"), tokenizer=tokenizer, dtype=None)
    writer.close()
    if rank == 0:
        logger.info("final model written to %s%s", out_dir / "final",
                    f" (adapter: {out_dir / 'final_adapter'})" if uses_lora(cfg) else "")
        print(run_summary(cfg, total_steps, last), file=sys.stderr, flush=True)
    return TrainResult(run, last)


def run_summary(cfg: TrainConfig, steps: int, last: dict[str, float]) -> str:
    """What a finished run produced and what to run next (printed at the end of `dpo-ds train`)."""
    final = Path(cfg.output_dir) / "final"
    shown = [(key, last[key]) for key in ("loss", "rewards/accuracies", "rewards/margins", "eval/loss",
                                          "eval/rewards/accuracies", "eval/rewards/margins") if key in last]
    latest = Path(cfg.output_dir) / ckpt.CHECKPOINTS_DIR / ckpt.LATEST
    lines = [f"done: {steps} steps; last logged " + ", ".join(f"{key} {value:.4g}" for key, value in shown),
             f"model: {final} (Hugging Face safetensors); metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}",
             f"next: dpo-ds eval --model {final} --data {cfg.eval_file or 'HELD_OUT_PAIRS'}"]
    if latest.is_file():
        lines.append(f"      dpo-ds convert {latest.parent / latest.read_text().strip()} OUT_DIR --dtype bf16  "
                     f"(another dtype or shard size from the last checkpoint)")
    return "\n".join(lines)


def _report_bad_step(step: int, micro_batches: list[list[int]], pairs: TokenizedPairs, in_a_row: int,
                     limit: int, rank: int) -> None:
    ids = [pairs.pair_ids[i] for batch in micro_batches for i in batch]
    if rank == 0:
        logger.warning("step %d skipped: NaN/Inf in the loss or gradients (%d in a row); pairs on rank 0: %s",
                       step, in_a_row, ", ".join(ids))
    if in_a_row >= limit:
        raise TrainingStopped(f"stopped at step {step}: {in_a_row} consecutive optimizer steps had NaN/Inf loss or "
                              f"gradients (max_bad_steps={limit}); pairs of the last one on rank {rank}: {', '.join(ids)}")


def _kl_exceeded(cfg: TrainConfig, metrics: dict[str, float], step: int, rank: int) -> bool:
    """The max_kl guard on this window's mean per-token KL estimate; True when the run must stop."""
    if cfg.max_kl is None:
        return False
    kl = max(metrics["kl/chosen"], metrics["kl/rejected"])
    if kl <= cfg.max_kl:
        return False
    if rank == 0:
        logger.warning("step %d: mean per-token log pi - log pi_ref = %.4f exceeds max_kl = %g", step, kl, cfg.max_kl)
    return cfg.stop_on_max_kl


def _mean_over_ranks(values: list[torch.Tensor]) -> float:
    total = torch.stack(values).sum().double().cpu() if values else torch.zeros((), dtype=torch.float64)
    totals = all_reduce(torch.stack([total, torch.tensor(float(len(values)), dtype=torch.float64)]))
    return float(totals[0] / max(float(totals[1]), 1.0))


def _seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _progress(total: int, start: int, rank: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="dpo", dynamic_ncols=True, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        check_paths(cfg)
        train(cfg)
    except (ConfigError, DataError, ckpt.CheckpointError, TrainingStopped, LoadError) as err:
        print(f"dpo-ds train: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        logger.warning("%s", stop)
        return ckpt.EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to checkpoint yet
        print("dpo-ds train: interrupted before training started (no checkpoint)", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
