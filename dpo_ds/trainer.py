"""`dpo-ds train`: the DPO recipe.

    for each optimizer step k:                       train_step: pairs [k*G, (k+1)*G) of the epoch order
        for each micro-batch of B pairs on this rank:    pair_step
            batch     = [prompt+chosen ; prompt+rejected]           one 2B-row batch
            ref_logps = reference.logps(batch)                       frozen, no grad
            logps     = sequence_logps(policy(batch))                 one forward, checkpointed
            loss      = LOSSES[loss_type](logps, ref_logps).mean()
            policy.backward(loss); policy.step()                     DeepSpeed steps at the GA boundary

`train` wraps it in named steps: check_before_loading, load_data, cut_into_steps, resume, build_run, the
TrainingLoop (guard_bad_step, log + the max_kl guard, evaluate, checkpoint_or_stop) and export.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed import DeepSpeedEngine

from dpo_ds import checkpoint as ckpt
from dpo_ds import engines, run_dir
from dpo_ds.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    to_dict,
    uses_lora,
    uses_reference,
)
from dpo_ds.convert import export_engine, export_merged_from_base
from dpo_ds.data import DataError, MicroBatch, PairSampler, TokenizedPairs, rank_shares
from dpo_ds.engines import attention_kernel, build_policy_engine, model_dtype, resolve_policy_config
from dpo_ds.families import check_model_family, load_model_config
from dpo_ds.loading import LoadError
from dpo_ds.losses import LossParams, PairLogps, compute_loss
from dpo_ds.hf_dir import ConfigOverride, ExportError
from dpo_ds.lora import Adapters, merge_adapter, save_adapter
from dpo_ds.metrics import MetricsWriter, PairStats, max_over_ranks, peak_memory_gib, setup_logging, untimed
from dpo_ds.prepare import cache_dir_of, load_config_data
from dpo_ds.reference import ReferenceSource, build_reference
from dpo_ds.reference_check import check_reference_compatible
from launcher.dist import all_reduce, barrier, check_shared_dirs, gather_objects, init_distributed, process_rank

HELP = __doc__
logger = logging.getLogger("dpo_ds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


@dataclass
class Run:
    """Everything a step needs, built once."""
    cfg: TrainConfig
    rank: int
    world_size: int
    policy: DeepSpeedEngine     # being trained (or scored, in `dpo-ds eval`)
    reference: ReferenceSource
    loss_params: LossParams
    pad_id: int
    policy_head: torch.nn.Linear | None = None  # engines.scoring_head of the policy, resolved once
    config_overrides: list[ConfigOverride] = field(default_factory=list)  # undone in the configs the run writes
    adapters: Adapters | None = None  # LoRA's peft handle
    timer: Callable[[str], AbstractContextManager] = untimed  # metrics.SectionTimer in `dpo-ds bench`
    aux_losses: list = field(default_factory=list)  # router load-balancing losses of training micro-batches since the last log

    @classmethod
    def create(cls, cfg: TrainConfig, rank: int, world_size: int, policy: DeepSpeedEngine, reference: ReferenceSource,
               pad_id: int, config_overrides: list[ConfigOverride] | None = None, adapters: Adapters | None = None) -> Run:
        """A Run for `policy` (trained by `train`, or only scored by `dpo-ds eval`)."""
        return cls(cfg, rank, world_size, policy, reference, loss_params(cfg), pad_id,
                   engines.scoring_head(policy.module, cfg.fused_lm_head), config_overrides or [], adapters)


def split_pairs(logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor) -> PairLogps:
    """Rows [0, B) of the 2B batch are chosen, rows [B, 2B) rejected."""
    b = logps.shape[0] // 2
    ref_logps = engines.to_device(ref_logps, logps.device)
    return PairLogps(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], tokens[:b], tokens[b:])


def pair_step(run: Run, pairs: TokenizedPairs, indices: list[int], stats: PairStats | None, train: bool,
              loss_scale: float | None = None):
    """Loss of one micro-batch of pairs (backward + step when training); adds its numbers to `stats`.

    The loss is the pairs' mean, or their sum x `loss_scale` (PairSampler.loss_scale) when micro-batches hold
    different numbers of pairs."""
    micro = MicroBatch.of(pairs, indices, run.pad_id, run.cfg.padding_free)
    batch = micro.tensors
    with run.timer("reference_forward"):
        ref_logps = run.reference.logps(micro)
    with run.timer("policy_forward"), torch.set_grad_enabled(train):
        aux_coef = run.cfg.router_aux_loss_coef if train else 0.0  # evaluation scores preferences only
        if aux_coef > 0:
            logps, tokens, aux = engines.forward_logps_and_aux(run.policy, batch, run.cfg.logprob_chunk_size,
                                                               run.policy_head, router_aux=True)
        else:
            # called through the module: tests/dist_fault_probe.py replaces engines.forward_logps to inject NaN
            logps, tokens = engines.forward_logps(run.policy, batch, run.cfg.logprob_chunk_size, run.policy_head)
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
def evaluate_pairs(run: Run, pairs: TokenizedPairs) -> tuple[dict[str, float], list[dict]]:
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
    return Run.create(cfg, rank, world_size, policy.engine, reference, pad_id, policy.config_overrides, policy.adapters)


@dataclass
class TrainResult:
    run: Run
    metrics: dict[str, float]  # the last logged values (with eval/ keys when eval_file is set)


class TrainingStopped(RuntimeError):
    """A guard stopped the run (NaN/Inf steps, max_kl); the message says which and where."""


class Preempted(Exception):
    """A stop signal arrived; the checkpoint is written and the process should exit with EXIT_PREEMPTED."""


def train(cfg: TrainConfig) -> TrainResult:
    """The run, step by step (each step a function below): start the process group and catch stop signals;
    refuse what cannot work before loading anything; load the data; cut it into steps; find where to resume;
    build the engines; train (guards, evaluation and preemption checkpoints inside the loop); export."""
    from transformers import AutoTokenizer  # heavy: kept out of `dpo-ds train --help`

    env = init_distributed(timeout_s=cfg.dist_timeout_s)
    setup_logging(env.rank)
    stop_signal = ckpt.StopSignal()
    torch.manual_seed(cfg.seed)
    check_before_loading(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    data = load_data(cfg, tokenizer, env.rank)
    sampler, total_steps = cut_into_steps(cfg, data.train, env.rank, env.world_size)
    resume_dir, saved = ckpt.resume_point(cfg.output_dir, cfg.resume_from, trainer_state(cfg, sampler, data, 0),
                                          cfg.resume_ignore_mismatch)
    write_run_config(cfg, env.rank)  # only once every check has passed: a refused start leaves the folder as it was
    run = build_run(cfg, env.rank, env.world_size, total_steps, pad_id_of(tokenizer), data.datasets,
                    load_universal=saved is not None and saved.world_size != env.world_size)
    start_step = resume(run, resume_dir, saved)
    loop = TrainingLoop(run, sampler, data, tokenizer, stop_signal, total_steps, start_step)
    last = loop.run_steps()
    export(run, tokenizer)
    loop.writer.close()
    if env.rank == 0:
        run_dir.mark_finished(cfg.output_dir, total_steps)
        print(run_summary(cfg, total_steps, last), file=sys.stderr, flush=True)
    return TrainResult(run, last)


@dataclass
class TrainData:
    train: TokenizedPairs
    fingerprint: str                # of the train pairs: a resumed run must see the same data
    eval: TokenizedPairs | None

    @property
    def datasets(self) -> list[TokenizedPairs]:
        return [p for p in (self.train, self.eval) if p is not None]


def check_before_loading(cfg: TrainConfig) -> None:
    """What can be refused before any model or data is loaded: an output_dir holding a run's outputs, directories
    not shared by every rank, a model that cannot work, a reference that tokenizes differently."""
    run_dir.check_output_dir(cfg.output_dir, cfg.resume_from, cfg.overwrite)
    check_shared_dirs({"output_dir": cfg.output_dir, "cache_dir": cache_dir_of(cfg)})
    check_model_family(cfg)
    if cfg.ref_model_name_or_path and uses_reference(cfg):  # the seed's rule: one tokenization for both models
        check_reference_compatible(cfg.model_name_or_path, cfg.ref_model_name_or_path, cfg.trust_remote_code)


def load_data(cfg: TrainConfig, tokenizer, rank: int) -> TrainData:
    return TrainData(*load_config_data(cfg, tokenizer, rank, barrier))


def cut_into_steps(cfg: TrainConfig, pairs: TokenizedPairs, rank: int, world_size: int) -> tuple[PairSampler, int]:
    """The sampler (which pairs each rank uses at each step) and the number of optimizer steps to run."""
    sampler = PairSampler.for_config(cfg, pairs, world_size)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{cfg.train_file}: {len(pairs)} usable pairs, fewer than one optimizer step's "
                        f"{sampler.pairs_per_step} (micro_batch_size x gradient_accumulation_steps x {world_size} ranks)")
    total_steps = cfg.max_steps or sampler.total_steps(cfg.num_epochs)
    if rank == 0:
        logger.info("%d pairs, %d per step on %d ranks, %d steps", len(pairs), sampler.pairs_per_step,
                    world_size, total_steps)
    return sampler, total_steps


def trainer_state(cfg: TrainConfig, sampler: PairSampler, data: TrainData, step: int) -> ckpt.TrainerState:
    return ckpt.TrainerState(step=step, sampler=sampler.state(step), world_size=sampler.world_size,
                             pairs_per_step=sampler.pairs_per_step, data_fingerprint=data.fingerprint,
                             model_fingerprint=ckpt.model_fingerprint(cfg.model_name_or_path), config=to_dict(cfg))


def write_run_config(cfg: TrainConfig, rank: int) -> None:
    if rank == 0:
        run_dir.clear_for_overwrite(cfg.output_dir, cfg.resume_from, cfg.overwrite)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))


def resume(run: Run, resume_dir: Path | None, saved: ckpt.TrainerState | None) -> int:
    """Load the checkpoint `ckpt.resume_point` chose, if any; the step to start from."""
    if saved is None:
        return 0
    ckpt.load_checkpoint(run.policy, resume_dir, saved, run.world_size, adapter_only=run.adapters is not None)
    if run.rank == 0:
        logger.info("resumed from step %d (%s)", saved.step, resume_dir)
    return saved.step


@dataclass
class StepResult:
    stats: PairStats               # this rank's pairs of the step
    micro_batches: list[list[int]]


def train_step(run: Run, sampler: PairSampler, pairs: TokenizedPairs, step: int) -> StepResult:
    """One optimizer step on this rank: its micro-batches of `step`, each scored and back-propagated; DeepSpeed
    applies the update at the accumulation boundary. Shared by `train` and `dpo-ds bench`."""
    started = time.perf_counter()
    stats = PairStats()
    micro_batches = sampler.micro_batches(step, run.rank)
    scale = sampler.loss_scale(step) if run.cfg.max_tokens_per_micro_batch else None
    for indices in micro_batches:
        pair_step(run, pairs, indices, stats, train=True, loss_scale=scale)
    stats.add_step_time(time.perf_counter() - started)
    return StepResult(stats, micro_batches)


class TrainingLoop:
    """Steps start_step..total_steps with what happens between them: the NaN/Inf and max_kl guards, metrics,
    evaluation, periodic and preemption checkpoints."""

    def __init__(self, run: Run, sampler: PairSampler, data: TrainData, tokenizer, stop_signal: ckpt.StopSignal,
                 total_steps: int, start_step: int):
        self.run, self.sampler, self.data, self.tokenizer = run, sampler, data, tokenizer
        self.stop_signal, self.total_steps, self.start_step = stop_signal, total_steps, start_step
        self.writer = MetricsWriter(run.cfg.output_dir, enabled=run.rank == 0, after_step=start_step)
        self.window = PairStats()  # applied steps since the last log line
        self.skipped = 0           # steps skipped for NaN/Inf so far
        self.bad_in_a_row = 0
        self.last: dict[str, float] = {}  # the last logged values

    def run_steps(self) -> dict[str, float]:
        run, cfg = self.run, self.run.cfg
        if ckpt.any_rank(self.stop_signal.received is not None):  # during start-up: no step of this run to save
            self.writer.close()
            raise Preempted(f"stopped by a signal before step {self.start_step + 1}; nothing new to checkpoint; "
                            f"resume with --resume_from auto")
        progress = _progress(self.total_steps, self.start_step, run.rank)
        for step in range(self.start_step, self.total_steps):
            lr = run.policy.get_lr()[0]  # the rate this step uses (the scheduler advances inside the step)
            result = train_step(run, self.sampler, self.data.train, step)
            done = step + 1
            if step == self.start_step and run.rank == 0:
                logger.info("step %d done %.1f s after the process started", done, _seconds_since_process_start())
            self.guard_bad_step(done, result)
            if done % cfg.logging_steps == 0 or done == self.total_steps:
                self.log(done, lr)
            if self.data.eval is not None and (done == self.total_steps or (cfg.eval_steps and done % cfg.eval_steps == 0)):
                self.evaluate(done)
            if progress is not None:
                progress.update(1)
                if "loss" in self.last:
                    progress.set_postfix(loss=f"{self.last['loss']:.4f}")
            self.checkpoint_or_stop(done)
        if progress is not None:
            progress.close()
        return self.last

    def guard_bad_step(self, done: int, result: StepResult) -> None:
        if self.run.policy.was_step_applied():
            self.window.merge(result.stats)
            self.bad_in_a_row = 0
        else:  # NaN/Inf gradients: DeepSpeed skipped the update on every rank (non-finite grad norm)
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1
            _report_bad_step(done, result.micro_batches, self.data.train, self.bad_in_a_row,
                             self.run.cfg.max_bad_steps, self.run.rank)

    def log(self, done: int, lr: float) -> None:
        """The window's metrics to metrics.jsonl / TensorBoard, then the max_kl guard on them."""
        run, cfg = self.run, self.run.cfg
        last = self.window.reduce()
        if cfg.router_aux_loss_coef > 0:
            last["aux_loss"] = _mean_over_ranks(run.aux_losses)
            run.aux_losses.clear()
        last.update({"grad_norm": _grad_norm(run.policy), "lr": lr, "skipped_steps": self.skipped,
                     "memory/peak_gib": max_over_ranks(peak_memory_gib()), "epoch": done / self.sampler.steps_per_epoch})
        self.writer.write(done, last)
        self.last, self.window = last, PairStats()
        if _kl_exceeded(cfg, last, done, run.rank):
            save_checkpoint(run, trainer_state(cfg, self.sampler, self.data, done), self.tokenizer)
            raise TrainingStopped(f"stopped at step {done}: mean KL to the reference exceeded max_kl={cfg.max_kl} "
                                  f"(stop_on_max_kl); checkpoint saved")

    def evaluate(self, done: int) -> None:
        self.run.policy.eval()
        eval_metrics, _ = evaluate_pairs(self.run, self.data.eval)
        self.run.policy.train()
        self.writer.write(done, eval_metrics)
        self.last.update(eval_metrics)

    def checkpoint_or_stop(self, done: int) -> None:
        """A checkpoint every save_steps, and after a stop signal on any rank, which then ends the run (Preempted)."""
        cfg = self.run.cfg
        stop = ckpt.any_rank(self.stop_signal.received is not None)
        if stop and self.run.rank == 0:
            logger.warning("stop requested by a signal: checkpointing after step %d", done)
        if stop or (cfg.save_steps and done % cfg.save_steps == 0):
            save_checkpoint(self.run, trainer_state(cfg, self.sampler, self.data, done), self.tokenizer)
        if stop and done < self.total_steps:
            self.writer.close()
            raise Preempted(f"stopped by a signal after step {done}; resume with --resume_from auto")


def export(run: Run, tokenizer) -> None:
    """`final/` (and LoRA's `final_adapter/`): what the run produced, for serving."""
    out_dir = Path(run.cfg.output_dir)
    if run.adapters is not None:  # final_adapter/ first: merging replaces the LoRA layers by the merged base layers
        save_adapter(run.policy, run.adapters, str(out_dir / "final_adapter"))
    if run.cfg.lora_quantize is not None:  # QLoRA: the live base holds only the nf4 approximation of the weights
        export_merged_from_base(run.policy, run.adapters, str(out_dir / "final"), tokenizer, model_dtype(run.cfg),
                                run.config_overrides)
    else:
        if run.adapters is not None:
            merge_adapter(run.policy, run.adapters)
        export_engine(run.policy, str(out_dir / "final"), tokenizer=tokenizer, config_overrides=run.config_overrides)
    if run.rank == 0:
        logger.info("final model written to %s%s", out_dir / "final",
                    f" (adapter: {out_dir / 'final_adapter'})" if run.adapters is not None else "")


def save_checkpoint(run: Run, state: ckpt.TrainerState, tokenizer) -> None:
    ckpt.save_checkpoint(run.policy, run.cfg.output_dir, state, run.cfg.save_total_limit, tokenizer, run.config_overrides,
                         run.adapters.config if run.adapters is not None else None)


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
        train(config_from_args(args))
    except (ConfigError, DataError, ckpt.CheckpointError, ExportError, TrainingStopped, LoadError) as err:
        shared = getattr(err, "same_on_every_rank", False)
        if not shared or process_rank() == 0:  # a failure every rank raised: one line, from rank 0
            print(f"dpo-ds train: error: {err}", file=sys.stderr, flush=True)
        if shared:
            barrier()  # under torchrun the first rank to exit gets the others killed: not before rank 0 has said why
        return 2
    except Preempted as stop:
        logger.warning("%s", stop)
        return ckpt.EXIT_PREEMPTED
    except run_dir.RunFinished as finished:
        logger.info("%s", finished)
        return 0
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to checkpoint yet
        print("dpo-ds train: interrupted before training started (no checkpoint)", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
