"""`dpo-ds train`: the DPO recipe around the step (dpo_ds.step).

`train` is a sequence of named steps: check_before_loading, load_data, cut_into_steps, resume_point, build the
step context, resume, the TrainingLoop (guard_bad_step, log + the max_kl guard, evaluate, checkpoint_or_stop) and
export.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_ds import checkpoint as ckpt
from dpo_ds import run_dir, sequence_parallel
from dpo_ds.config import TrainConfig, add_config_arguments, config_from_args, to_dict, uses_lora, uses_reference
from dpo_ds.console import Progress, emit, setup_logging
from dpo_ds.convert import export_engine, export_merged_from_base
from dpo_ds.data import DataError, PairSampler, TokenizedPairs
from dpo_ds.engines import (model_dtype, policy_zero_stage, resolve_padding_free, resolve_policy_config,
                            resolve_reference_config)
from dpo_ds.engines.ds_config import default_config_path
from dpo_ds.errors import Preempted, UsageError
from dpo_ds.families import check_model_family, load_model_config
from dpo_ds.lora import merge_adapter, save_adapter
from dpo_ds.losses import Objective
from dpo_ds.metrics import MetricsWriter, PairStats, max_over_ranks, peak_memory_gib
from dpo_ds.parallel import Parallel
from dpo_ds.prepare import cache_dir_of, load_config_examples
from dpo_ds.reference_check import check_reference_compatible
from dpo_ds.stop_signal import StopSignal
from dpo_ds.step import StepContext, StepResult, build_step_context, evaluate_pairs, pad_id_of, train_step

HELP = __doc__
logger = logging.getLogger("dpo_ds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="Check the run without training, in one process (before an sbatch): config and paths, "
                             "the output folder, the model family, the reference's tokenization, the DeepSpeed "
                             "configs, the data (prepared into cache_dir, as train would) and the checkpoint to "
                             "resume from; print what the run would train on. Exit 2 with the first problem.")
    add_config_arguments(parser)


@dataclass
class TrainResult:
    ctx: StepContext
    metrics: dict[str, float]  # the last logged values (with eval/ keys when eval_file is set)


class TrainingStopped(UsageError):
    """A guard stopped the run (NaN/Inf steps, max_kl); the message says which and where."""


def train(cfg: TrainConfig) -> TrainResult:
    """The run, step by step (each step a function below): start the process group and catch stop signals;
    refuse what cannot work before loading anything; load the data; cut it into steps; find where to resume;
    build the engines; train (guards, evaluation and preemption checkpoints inside the loop); export."""
    from transformers import AutoTokenizer  # heavy: kept out of `dpo-ds train --help`

    parallel = Parallel.init(timeout_s=cfg.dist_timeout_s, sequence_parallel_size=cfg.sequence_parallel_size)
    setup_logging(parallel.rank)
    stop_signal = StopSignal()
    torch.manual_seed(cfg.seed)
    check_before_loading(cfg, parallel, parallel.world_size)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    data = TrainData(*load_config_examples(cfg, tokenizer, parallel))
    sampler, total_steps = cut_into_steps(cfg, data.train, parallel)
    current = trainer_state(cfg, sampler, data, parallel, 0)
    resume_dir, saved = ckpt.resume_point(cfg.output_dir, cfg.resume_from, current, cfg.resume_ignore_mismatch,
                                          parallel)
    write_run_config(cfg, parallel)  # only once every check has passed: a refused start leaves the folder as it was
    load_universal = saved is not None and saved.deepspeed_loads_universal(current.world_size, current.zero_stage)
    ctx = build_step_context(cfg, parallel, total_steps, pad_id_of(tokenizer), data.datasets,
                             load_universal=load_universal)
    start_step = resume(ctx, resume_dir, saved)
    loop = TrainingLoop(ctx, sampler, data, tokenizer, stop_signal, total_steps, start_step)
    last = loop.train()
    export(ctx, tokenizer)
    loop.writer.close()
    if parallel.is_main:
        run_dir.mark_finished(cfg.output_dir, total_steps)
        print(finished_summary(cfg, total_steps, last), file=sys.stderr, flush=True)
    return TrainResult(ctx, last)


@dataclass
class TrainData:
    train: TokenizedPairs
    fingerprint: str                # of the train pairs: a resumed run must see the same data
    eval: TokenizedPairs | None

    @property
    def datasets(self) -> list[TokenizedPairs]:
        return [p for p in (self.train, self.eval) if p is not None]


def check_before_loading(cfg: TrainConfig, parallel: Parallel, world_size: int) -> None:
    """What can be refused before any model or data is loaded: an output_dir holding a run's outputs, directories
    not shared by every rank, a model that cannot work, a reference that tokenizes differently, settings
    sequence parallelism cannot run with on `world_size` ranks. padding_free auto is settled once the model is
    known to be one dpo-ds can train, before the checks of the attention kernel it decides."""
    run_dir.check_output_dir(cfg.output_dir, cfg.resume_from, cfg.overwrite)
    parallel.check_shared_dirs({"output_dir": cfg.output_dir, "cache_dir": cache_dir_of(cfg)})
    check_model_family(cfg)
    resolve_padding_free(cfg)
    if cfg.ref_model_name_or_path and uses_reference(cfg):  # the seed's rule: one tokenization for both models
        check_reference_compatible(cfg.model_name_or_path, cfg.ref_model_name_or_path, cfg.trust_remote_code)
    if cfg.sequence_parallel_size > 1:
        check_sequence_parallel(cfg, world_size)


def check_sequence_parallel(cfg: TrainConfig, world_size: int) -> None:
    """ConfigError naming sequence_parallel_size for a model (policy or separate reference) or policy DeepSpeed
    config it cannot run with (dpo_ds.sequence_parallel.check_models / check_deepspeed_config)."""
    size = cfg.sequence_parallel_size
    sequence_parallel.check_models(cfg, world_size)
    hidden = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code).hidden_size
    sequence_parallel.check_deepspeed_config(resolve_policy_config(cfg, world_size // size, hidden), size,
                                             str(cfg.deepspeed_config or default_config_path("policy")))


def cut_into_steps(cfg: TrainConfig, pairs: TokenizedPairs, parallel: Parallel) -> tuple[PairSampler, int]:
    """The sampler (which pairs each data-parallel rank uses at each step) and the number of optimizer steps."""
    sampler = PairSampler.for_config(cfg, pairs, parallel.data_parallel_size)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{cfg.train_file}: {pairs.counted()} usable, fewer than one optimizer step's "
                        f"{sampler.pairs_per_step} (micro_batch_size x gradient_accumulation_steps x "
                        f"{parallel.data_parallel_size} ranks)")
    total_steps = cfg.max_steps or sampler.total_steps(cfg.num_epochs)
    if parallel.is_main:
        logger.info("%s, %d per step on %d data-parallel ranks, %d steps", pairs.counted(), sampler.pairs_per_step,
                    parallel.data_parallel_size, total_steps)
    return sampler, total_steps


def trainer_state(cfg: TrainConfig, sampler: PairSampler, data: TrainData, parallel: Parallel,
                  step: int, objective: Objective | None = None) -> ckpt.TrainerState:
    return ckpt.TrainerState(step=step, sampler=sampler.state(step), world_size=parallel.world_size,
                             pairs_per_step=sampler.pairs_per_step, data_fingerprint=data.fingerprint,
                             model_fingerprint=ckpt.model_fingerprint(cfg.model_name_or_path), config=to_dict(cfg),
                             loss_state=objective.state_dict() if objective is not None else {},
                             zero_stage=policy_zero_stage(cfg, parallel.data_parallel_size))


def write_run_config(cfg: TrainConfig, parallel: Parallel) -> None:
    if parallel.is_main:
        run_dir.clear_for_overwrite(cfg.output_dir, cfg.resume_from, cfg.overwrite)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))


def resume(ctx: StepContext, resume_dir: Path | None, saved: ckpt.TrainerState | None) -> int:
    """Load the checkpoint `ckpt.resume_point` chose, if any; the step to start from."""
    if saved is None:
        return 0
    ckpt.load_checkpoint(ctx.policy, resume_dir, saved, ctx.parallel, adapter_only=ctx.adapters is not None)
    ctx.objective.load_state_dict(saved.loss_state)
    if ctx.parallel.is_main:
        logger.info("resumed from step %d (%s)", saved.step, resume_dir)
    return saved.step


class TrainingLoop:
    """Steps start_step..total_steps with what happens between them: the NaN/Inf and max_kl guards, metrics,
    evaluation, periodic and preemption checkpoints."""

    def __init__(self, ctx: StepContext, sampler: PairSampler, data: TrainData, tokenizer, stop_signal: StopSignal,
                 total_steps: int, start_step: int):
        self.ctx, self.sampler, self.data, self.tokenizer = ctx, sampler, data, tokenizer
        self.stop_signal, self.total_steps, self.start_step = stop_signal, total_steps, start_step
        self.writer = MetricsWriter(ctx.cfg.output_dir, enabled=ctx.parallel.is_main, after_step=start_step)
        self.progress = Progress(total_steps, start_step, enabled=ctx.parallel.is_main)
        self.window = PairStats(ctx.parallel, components=ctx.objective.logged_components)  # applied steps since the last log line
        self.skipped = 0           # steps skipped for NaN/Inf so far
        self.bad_in_a_row = 0
        self.last: dict[str, float] = {}  # the last logged values

    def train(self) -> dict[str, float]:
        """Train steps start_step..total_steps; the last logged metrics."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if ckpt.any_rank(self.stop_signal.received is not None):  # during start-up: no step of this run to save
            self.writer.close()
            raise Preempted(f"stopped by a signal before step {self.start_step + 1}; nothing new to checkpoint; "
                            f"resume with --resume_from auto")
        for step in range(self.start_step, self.total_steps):
            lr = ctx.policy.get_lr()[0]  # the rate this step uses (the scheduler advances inside the step)
            result = train_step(ctx, self.sampler, self.data.train, step)
            done = step + 1
            if step == self.start_step and ctx.parallel.is_main:
                logger.info("step %d done %.1f s after the process started", done, _seconds_since_process_start())
            self.guard_bad_step(done, result)
            if done % cfg.logging_steps == 0 or done == self.total_steps:
                self.log(done, lr)
            if self.data.eval is not None and (done == self.total_steps or (cfg.eval_steps and done % cfg.eval_steps == 0)):
                self.evaluate(done)
            self.progress.step_done(self.last.get("loss"))
            self.checkpoint_or_stop(done)
        self.progress.close()
        return self.last

    def guard_bad_step(self, done: int, result: StepResult) -> None:
        if self.ctx.policy.was_step_applied():
            self.window.merge(result.stats)
            self.bad_in_a_row = 0
        else:  # NaN/Inf gradients: DeepSpeed skipped the update on every rank (non-finite grad norm)
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1
            _report_bad_step(done, result.micro_batches, self.data.train, self.bad_in_a_row,
                             self.ctx.cfg.max_bad_steps, self.ctx.parallel)

    def log(self, done: int, lr: float) -> None:
        """The window's metrics to metrics.jsonl / TensorBoard, then the max_kl guard on them."""
        ctx, cfg = self.ctx, self.ctx.cfg
        last = self.window.reduce()
        if cfg.router_aux_loss_coef > 0:
            last["aux_loss"] = _mean_over_data(ctx.aux_losses, ctx.parallel)
            ctx.aux_losses.clear()
        last.update(ctx.objective.metrics())
        last.update({"grad_norm": _grad_norm(ctx.policy), "lr": lr, "skipped_steps": self.skipped,
                     "memory/peak_gib": max_over_ranks(peak_memory_gib()), "epoch": done / self.sampler.steps_per_epoch})
        self.writer.write(done, last)
        self.progress.logged(done, last, int(last["window_steps"]), cfg.logging_steps)
        self.last, self.window = last, PairStats(ctx.parallel, components=ctx.objective.logged_components)
        if _kl_exceeded(cfg, last, done, ctx.parallel):
            save_checkpoint(ctx, trainer_state(cfg, self.sampler, self.data, ctx.parallel, done, ctx.objective),
                            self.tokenizer)
            raise TrainingStopped(f"stopped at step {done}: mean KL to the reference exceeded max_kl={cfg.max_kl} "
                                  f"(stop_on_max_kl); checkpoint saved")

    def evaluate(self, done: int) -> None:
        self.ctx.policy.eval()
        eval_metrics, _ = evaluate_pairs(self.ctx, self.data.eval)
        self.ctx.policy.train()
        self.writer.write(done, eval_metrics)
        self.last.update(eval_metrics)
        if self.ctx.parallel.is_main:  # on the console when it runs, not only in metrics.jsonl
            logger.info("eval at step %d: loss %.4g | accuracy %.3f | margin %.4g", done, eval_metrics["eval/loss"],
                        eval_metrics["eval/rewards/accuracies"], eval_metrics["eval/rewards/margins"])

    def checkpoint_or_stop(self, done: int) -> None:
        """A checkpoint every save_steps, and after a stop signal on any rank, which then ends the run (Preempted)."""
        cfg = self.ctx.cfg
        stop = ckpt.any_rank(self.stop_signal.received is not None)
        if stop and self.ctx.parallel.is_main:
            logger.warning("stop requested by a signal: checkpointing after step %d", done)
        if stop or (cfg.save_steps and done % cfg.save_steps == 0):
            save_checkpoint(self.ctx, trainer_state(cfg, self.sampler, self.data, self.ctx.parallel, done,
                                                    self.ctx.objective), self.tokenizer)
        if stop and done < self.total_steps:
            self.writer.close()
            raise Preempted(f"stopped by a signal after step {done}; resume with --resume_from auto")


def export(ctx: StepContext, tokenizer) -> None:
    """`final/` (and LoRA's `final_adapter/`): what the run produced, for serving."""
    out_dir = Path(ctx.cfg.output_dir)
    if ctx.adapters is not None:  # final_adapter/ first: merging replaces the LoRA layers by the merged base layers
        save_adapter(ctx.policy, ctx.adapters, str(out_dir / "final_adapter"))
    if ctx.cfg.lora_quantize is not None:  # QLoRA: the live base holds only the nf4 approximation of the weights
        export_merged_from_base(ctx.policy, ctx.adapters, str(out_dir / "final"), tokenizer, model_dtype(ctx.cfg),
                                ctx.config_overrides)
    else:
        if ctx.adapters is not None:
            merge_adapter(ctx.policy, ctx.adapters)
        export_engine(ctx.policy, str(out_dir / "final"), tokenizer=tokenizer, config_overrides=ctx.config_overrides)
    if ctx.parallel.is_main:
        logger.info("final model written to %s%s", out_dir / "final",
                    f" (adapter: {out_dir / 'final_adapter'})" if ctx.adapters is not None else "")


def save_checkpoint(ctx: StepContext, state: ckpt.TrainerState, tokenizer) -> None:
    ckpt.save_checkpoint(ctx.policy, ctx.cfg.output_dir, state, ctx.parallel, ctx.cfg.save_total_limit, tokenizer,
                         ctx.config_overrides, ctx.adapters.config if ctx.adapters is not None else None)


def finished_summary(cfg: TrainConfig, steps: int, last: dict[str, float]) -> str:
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
                     limit: int, parallel: Parallel) -> None:
    ids = [pairs.pair_ids[i] for batch in micro_batches for i in batch]
    if parallel.is_main:
        logger.warning("step %d skipped: NaN/Inf in the loss or gradients (%d in a row); pairs on rank 0: %s",
                       step, in_a_row, ", ".join(ids))
    if in_a_row >= limit:
        raise TrainingStopped(f"stopped at step {step}: {in_a_row} consecutive optimizer steps had NaN/Inf loss or "
                              f"gradients (max_bad_steps={limit}); pairs of the last one on rank {parallel.rank}: {', '.join(ids)}")


def _kl_exceeded(cfg: TrainConfig, metrics: dict[str, float], step: int, parallel: Parallel) -> bool:
    """The max_kl guard on this window's mean per-token KL estimate; True when the run must stop."""
    if cfg.max_kl is None:
        return False
    kl = max(metrics["kl/chosen"], metrics["kl/rejected"])
    if kl <= cfg.max_kl:
        return False
    if parallel.is_main:
        logger.warning("step %d: mean per-token log pi - log pi_ref = %.4f exceeds max_kl = %g", step, kl, cfg.max_kl)
    return cfg.stop_on_max_kl


def _mean_over_data(values: list[torch.Tensor], parallel: Parallel) -> float:
    total = torch.stack(values).sum().double().cpu() if values else torch.zeros((), dtype=torch.float64)
    totals = parallel.sum_over_data(torch.stack([total, torch.tensor(float(len(values)), dtype=torch.float64)]))
    return float(totals[0] / max(float(totals[1]), 1.0))


def _seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def check_run(cfg: TrainConfig) -> str:
    """`dpo-ds train --check`: what `train` refuses before it starts engines, found in this process without a
    process group; the summary of what the run would train on."""
    from transformers import AutoTokenizer

    parallel = Parallel()
    check_before_loading(cfg, parallel, cfg.sequence_parallel_size)  # the smallest world the run can have
    hidden = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code).hidden_size
    resolve_policy_config(cfg, 1, hidden)
    if uses_reference(cfg) and not uses_lora(cfg):
        resolve_reference_config(cfg, hidden)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    data = TrainData(*load_config_examples(cfg, tokenizer, parallel))
    resume_dir = ckpt.find_checkpoint(cfg.output_dir, cfg.resume_from, parallel, repair=False)  # checksums too
    per_rank = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    lines = [f"check passed: {cfg.train_file}: {data.train.counted()}; {data.train.counted(per_rank)} per data-parallel rank per "
             f"optimizer step: {len(data.train) // per_rank} steps per epoch on 1 rank, "
             f"{len(data.train) // (8 * per_rank)} on 8"]
    if data.eval is not None:
        lines.append(f"  eval: {cfg.eval_file}: {data.eval.counted()}")
    lines.append(f"  resume: {resume_dir}" if resume_dir is not None else f"  a new run in {cfg.output_dir}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        if args.check:
            emit(check_run(cfg))
        else:
            train(cfg)
    except run_dir.RunFinished as finished:  # resume_from auto on a run that finished: nothing to do
        if args.check:
            emit(f"check passed: {finished}")
        else:
            logger.info("%s", finished)
    return 0
