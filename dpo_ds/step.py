"""The DPO step, shared by `dpo-ds train`, `eval` and `bench`.

    for each micro-batch of B pairs on this rank:                     pair_step
        batch     = [prompt+chosen ; prompt+rejected]                   one 2B-row batch
        ref_logps = reference.logps(batch)                               frozen, no grad
        logps     = sequence_logps(policy(batch))                         one forward, checkpointed
        loss      = objective(logps, ref_logps).mean()       losses.Objective: loss_type (+ loss_weights)
        policy.backward(loss); policy.step()                             DeepSpeed steps at the GA boundary

`build_step_context` builds what every step needs once (the engines, the reference source, the loss settings);
`train_step` runs one optimizer step's micro-batches, `evaluate_pairs` scores a dataset without training.
"""
from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import torch
from deepspeed import DeepSpeedEngine

from dpo_ds import scoring, sequence_parallel
from dpo_ds.config import TrainConfig, uses_lora
from dpo_ds.data import MicroBatch, PairSampler, TokenizedPairs, rank_shares
from dpo_ds.engines import attention_kernel, build_policy_engine, resolve_policy_config
from dpo_ds.families import load_model_config
from dpo_ds.hf_dir import ConfigOverride
from dpo_ds.lora import Adapters
from dpo_ds.logprobs import ld_token_weights
from dpo_ds.losses import Objective, PairLogps, UnpairedLogps
from dpo_ds.metrics import PairStats, untimed
from dpo_ds.parallel import Parallel
from dpo_ds.prepare import cache_dir_of
from dpo_ds.reference import ReferenceSource, build_reference
from dpo_ds.sequence_parallel import BatchScorer

logger = logging.getLogger("dpo_ds")


@dataclass
class StepContext:
    """Everything a step needs, built once."""
    cfg: TrainConfig
    parallel: Parallel
    policy: DeepSpeedEngine     # being trained (or scored, in `dpo-ds eval`)
    reference: ReferenceSource
    objective: Objective        # the loss (or weighted losses) and their state across steps
    pad_id: int
    policy_head: torch.nn.Linear | None = None  # scoring.scoring_head of the policy, resolved once
    config_overrides: list[ConfigOverride] = field(default_factory=list)  # undone in the configs the run writes
    adapters: Adapters | None = None  # LoRA's peft handle
    gradient_checkpointing: bool = False  # whether the policy's backward recomputes activations (engines.sizing)
    timer: Callable[[str], AbstractContextManager] = untimed  # metrics.SectionTimer in `dpo-ds bench`
    aux_losses: list = field(default_factory=list)  # router load-balancing losses of training micro-batches since the last log

    @classmethod
    def create(cls, cfg: TrainConfig, parallel: Parallel, policy: DeepSpeedEngine, reference: ReferenceSource,
               pad_id: int, config_overrides: list[ConfigOverride] | None = None,
               adapters: Adapters | None = None, gradient_checkpointing: bool = False) -> StepContext:
        """The context for `policy` (trained by `train`, or only scored by `dpo-ds eval`)."""
        return cls(cfg, parallel, policy, reference, Objective.from_config(cfg), pad_id,
                   scoring.scoring_head(policy.module, cfg.fused_lm_head), config_overrides or [], adapters,
                   gradient_checkpointing)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_step_context(cfg: TrainConfig, parallel: Parallel, total_steps: int, pad_id: int,
                       datasets: list[TokenizedPairs], load_universal: bool = False) -> StepContext:
    """The reference source first (with precompute_ref its engine is gone before the policy exists), then the
    policy engine: the same order on every rank, as ZeRO-3 requires. With LoRA the policy comes first: it is
    also the reference."""
    hidden = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code).hidden_size
    kernel = attention_kernel(cfg)
    ds_config = resolve_policy_config(cfg, parallel.data_parallel_size, hidden)
    if load_universal:  # resuming a checkpoint saved at another world size or ZeRO stage
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    mpu = sequence_parallel.attention_for_run(cfg, parallel, kernel)
    if uses_lora(cfg):  # the reference is the policy engine itself (adapter off): no second model
        policy = build_policy_engine(cfg, ds_config, total_steps, mpu)
        reference = build_reference(cfg, hidden, parallel, datasets, cache_dir_of(cfg), pad_id, policy)
    else:
        reference = build_reference(cfg, hidden, parallel, datasets, cache_dir_of(cfg), pad_id, mpu=mpu)
        policy = build_policy_engine(cfg, ds_config, total_steps, mpu)
    return StepContext.create(cfg, parallel, policy.engine, reference, pad_id, policy.config_overrides,
                              policy.adapters, policy.gradient_checkpointing)


def split_pairs(logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor,
                wpo: torch.Tensor | None = None) -> PairLogps:
    """Rows [0, B) of the 2B batch are chosen, rows [B, 2B) rejected. `wpo`: the WPO sums (use_weighting)."""
    b = logps.shape[0] // 2
    ref_logps = scoring.to_device(ref_logps, logps.device)
    wpo_halves = (None, None) if wpo is None else (wpo[:b], wpo[b:])
    return PairLogps(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], tokens[:b], tokens[b:], *wpo_halves)


def split_unpaired(logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor, examples,
                   indices: list[int]) -> UnpairedLogps:
    """Unpaired examples (data.TokenizedUnpaired): rows [0, B) are the completions, [B, 2B) the mismatched ones."""
    b = logps.shape[0] // 2
    ref_logps = scoring.to_device(ref_logps, logps.device)
    labels = scoring.to_device(torch.from_numpy(examples.labels[indices]), logps.device)
    return UnpairedLogps(logps[:b], ref_logps[:b], tokens[:b], logps[b:], ref_logps[b:], tokens[b:], labels)


def pair_step(ctx: StepContext, pairs: TokenizedPairs, indices: list[int], stats: PairStats | None, train: bool,
              loss_scale: float | None = None, counted: bool = True):
    """Loss of one micro-batch of pairs (or of unpaired examples, for an unpaired loss: KTO) (backward + step when
    training); adds its numbers to `stats`.

    The loss is the pairs' mean, or their sum x `loss_scale` (PairSampler.loss_scale) when micro-batches hold
    different numbers of pairs. `counted` False: a stand-in micro-batch of a rank with nothing left to score,
    which adds zeros to what the loss sums over ranks."""
    micro = MicroBatch.of(pairs, indices, ctx.pad_id, ctx.cfg.padding_free)
    batch = micro.tensors
    if ctx.cfg.ld_alpha is not None:  # LD-DPO: policy and reference sums weight the longer completion's tail
        batch["token_weights"] = ld_token_weights(batch["loss_mask"], ctx.cfg.ld_alpha, batch.get("sequence_ids"))
    with ctx.timer("reference_forward"):
        ref_logps = ctx.reference.logps(micro)
    with ctx.timer("policy_forward"), torch.set_grad_enabled(train):
        aux_coef = ctx.cfg.router_aux_loss_coef if train else 0.0  # evaluation scores preferences only
        # the whole batch, or under sequence parallelism this rank's shard with whole-sequence sums
        logps, tokens, aux, *wpo = BatchScorer(ctx.parallel, ctx.pad_id)(
            ctx.policy, batch, ctx.cfg.logprob_chunk_size, ctx.policy_head, aux_coef > 0, ctx.cfg.use_weighting)
        unpaired = ctx.objective.unit == "unpaired"
        lp = (split_unpaired(logps, tokens, ref_logps, pairs, indices) if unpaired
              else split_pairs(logps, tokens, ref_logps, *wpo))
        reduce = ctx.parallel.sum_over_data if counted else lambda t: ctx.parallel.sum_over_data(torch.zeros_like(t))
        out = ctx.objective(lp, train=train, reduce=reduce)
        loss = out.losses.mean() if loss_scale is None else out.losses.sum() * loss_scale
        if aux_coef > 0:  # as TRL: the micro-batch's load-balancing loss, weighted, on top of the preference loss
            loss = loss + aux_coef * aux.to(loss.dtype)
            ctx.aux_losses.append(aux.detach().float())  # read at the log line: no device sync per micro-step
    if train:
        with ctx.timer("backward"):
            ctx.policy.backward(loss)
        with ctx.timer("optimizer"):
            ctx.policy.step()
    if stats is not None:
        processed = batch["input_ids"].numel()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else processed
        (stats.add_unpaired if unpaired else stats.add_pairs)(lp, out, real_tokens=real, padded_tokens=processed)
    return lp, out


@dataclass
class StepResult:
    stats: PairStats               # this rank's pairs of the step
    micro_batches: list[list[int]]


def train_step(ctx: StepContext, sampler: PairSampler, pairs: TokenizedPairs, step: int) -> StepResult:
    """One optimizer step on this rank: its micro-batches of `step`, each scored and back-propagated; DeepSpeed
    applies the update at the accumulation boundary. Shared by `train` and `dpo-ds bench`."""
    started = time.perf_counter()
    stats = PairStats(ctx.parallel, components=ctx.objective.logged_components)
    micro_batches = sampler.micro_batches(step, ctx.parallel.data_parallel_rank)
    scale = sampler.loss_scale(step) if ctx.cfg.max_tokens_per_micro_batch else None
    for indices in micro_batches:
        pair_step(ctx, pairs, indices, stats, train=True, loss_scale=scale)
    stats.add_step_time(time.perf_counter() - started)
    return StepResult(stats, micro_batches)


EVAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected")


@torch.no_grad()
def evaluate_pairs(ctx: StepContext, pairs: TokenizedPairs) -> tuple[dict[str, float], list[dict]]:
    """Preference metrics over every pair of `pairs`, split over the data-parallel ranks (data.rank_shares), and
    per-pair records (on every rank, in pair order)."""
    stats = PairStats(ctx.parallel, components=ctx.objective.logged_components)
    records = []
    for mine in rank_shares(len(pairs), ctx.cfg.micro_batch_size, ctx.parallel):
        lp, out = pair_step(ctx, pairs, mine or [0], None, train=False, counted=bool(mine))
        if mine and ctx.objective.unit == "unpaired":
            stats.add_unpaired(lp, out, 0, 0)
            records += _unpaired_records(pairs, mine, lp, out)
        elif mine:
            stats.add_pairs(lp, out, 0, 0)
            records += _pair_records(pairs, mine, lp, out)
    metrics = stats.reduce()
    records = [r for part in ctx.parallel.gather_over_data(records) for r in part]
    records.sort(key=lambda r: r["index"])
    keys = (*EVAL_KEYS, *(f"loss/{n}" for n in ctx.objective.logged_components), *(("kl",) if "kl" in metrics else ()))
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


def _unpaired_records(examples, indices: list[int], u: UnpairedLogps, out) -> list[dict]:
    return [{"index": i, "example_id": examples.pair_ids[i], "label": bool(u.labels[j]),
             "policy_logp": float(u.policy[j]), "ref_logp": float(u.reference[j]), "tokens": int(u.tokens[j]),
             "reward": float(out.chosen_rewards[j]), "reference_point": float(out.reference_point),
             "loss": float(out.losses[j])} for j, i in enumerate(indices)]
