"""Reference sources: where log pi_ref of a micro-batch comes from. The trainer never asks which it has: each
is a `ReferenceSource`, reading from the micro-batch what it needs (its tensors, or which pairs it holds).

- `LiveReference`: a frozen ZeRO-3 inference engine, run on every micro-batch.
- `CachedReference` (`precompute_ref: true`): one pass of that engine over the train and eval pairs before
  training, written to disk sharded by rank under `caches/ref-<fingerprint>/`, keyed by the reference model,
  the data fingerprint (file, tokenizer, template, max_length, truncation) and the precision, and reused by
  later runs. Training then runs no reference forward, and the engine is gone before the policy is built.
- `AdapterReference` (LoRA): the policy's own engine with the trained adapter switched off (or switched to
  the frozen copy of the starting adapter): no second model. With `precompute_ref` it fills the cache instead.
- `NoReference`: log pi_ref = 0 (SimPO, SFT, `reference_free`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from dpo_ds.checkpoint import model_fingerprint
from dpo_ds.config import TrainConfig, uses_reference
from dpo_ds.data import MicroBatch, TokenizedPairs, rank_shares
from dpo_ds.engines import (
    PolicyEngine,
    attention_kernel,
    build_inference_engine,
    model_dtype,
    policy_zero_stage,
    release_engine,
    resolve_reference_config,
)
from dpo_ds.scoring import scoring_head
from dpo_ds.lora import Adapters, adapter_fingerprint
from dpo_ds.parallel import Parallel
from dpo_ds.sequence_parallel import BatchScorer

logger = logging.getLogger("dpo_ds")


class ReferenceSource(Protocol):
    def logps(self, micro: MicroBatch) -> torch.Tensor:
        """log pi_ref (summed over completion tokens) of the micro-batch's 2B sequences, chosen then rejected."""


class LiveReference:
    """Reference log-probs from a ZeRO-3 inference engine, recomputed for every micro-batch (its tensors)."""

    def __init__(self, engine, chunk_size: int, head: torch.nn.Linear | None, score: BatchScorer):
        self.engine = engine
        self.chunk_size = chunk_size
        self.head = head  # scoring.scoring_head of the engine's model
        self.score = score  # the run's scoring: under sequence parallelism this rank's shard, as the policy's

    @torch.no_grad()
    def logps(self, micro: MicroBatch) -> torch.Tensor:
        return self.score(self.engine, micro.tensors, self.chunk_size, self.head)[0]


class AdapterReference(LiveReference):
    """LoRA: reference log-probs from the policy engine itself, its trained adapter switched off."""

    def __init__(self, engine, adapters: Adapters, chunk_size: int, head: torch.nn.Linear | None,
                 score: BatchScorer):
        super().__init__(engine, chunk_size, head, score)
        self.adapters = adapters

    @torch.no_grad()
    def logps(self, micro: MicroBatch) -> torch.Tensor:
        with self.adapters.as_reference(self.engine.module):
            return super().logps(micro)


class NoReference:
    """log pi_ref = 0: reference-free losses build no reference engine (only the number of sequences counts)."""

    def logps(self, micro: MicroBatch) -> torch.Tensor:
        return torch.zeros(micro.num_sequences)


class CachedReference:
    """Precomputed reference log-probs, one [N, 2] (chosen, rejected) table per dataset fingerprint, looked up
    by which pairs the micro-batch holds (no forward: its tensors are not read)."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def logps(self, micro: MicroBatch) -> torch.Tensor:
        table = self.tables[micro.examples.fingerprint]
        rows = torch.as_tensor(micro.indices)
        return torch.cat([table[rows, 0], table[rows, 1]])


def reference_path(cfg: TrainConfig) -> str:
    return cfg.ref_model_name_or_path or cfg.model_name_or_path


def _reference_engine(cfg: TrainConfig, hidden_size: int, data_parallel_size: int, mpu=None):
    ds_config = resolve_reference_config(cfg, hidden_size, policy_zero_stage(cfg, data_parallel_size))
    return build_inference_engine(reference_path(cfg), ds_config, model_dtype(cfg),
                                  cfg.trust_remote_code, cfg.weights_loader, attention_kernel(cfg), cfg, mpu)


def build_reference(cfg: TrainConfig, hidden_size: int, parallel: Parallel, datasets: list[TokenizedPairs] = (),
                    cache_dir: str | None = None, pad_id: int = 0, policy: PolicyEngine | None = None,
                    mpu=None) -> ReferenceSource:
    """The reference source the loss needs. With precompute_ref, every dataset's table is computed (or read
    from the cache) now; call it before building the policy so both engines never hold memory together.
    LoRA (`policy` given): the policy engine is the reference, with its trained adapter off. `mpu`: the
    sequence-parallel groups (sequence_parallel.setup) under S > 1."""
    if not uses_reference(cfg):
        return NoReference()
    score = BatchScorer(parallel, pad_id)

    def live_source():
        if policy is not None:
            return AdapterReference(policy.engine, policy.adapters, cfg.logprob_chunk_size,
                                    scoring_head(policy.engine.module, cfg.fused_lm_head), score)
        engine = _reference_engine(cfg, hidden_size, parallel.data_parallel_size, mpu)
        return LiveReference(engine, cfg.logprob_chunk_size, scoring_head(engine.module, cfg.fused_lm_head), score)

    if not cfg.precompute_ref:
        return live_source()
    caches = {pairs.fingerprint: Path(cache_dir) / f"ref-{_cache_key(cfg, pairs)}" for pairs in datasets}
    missing = [pairs for pairs in datasets if not (caches[pairs.fingerprint] / "complete.json").is_file()]
    if missing:
        source = live_source()
        for pairs in missing:
            _precompute(source, cfg, pairs, caches[pairs.fingerprint], pad_id, parallel)
        if policy is None:
            release_engine(source.engine)
    elif parallel.is_main:
        logger.info("reference log-probs read from %s", ", ".join(str(p) for p in caches.values()))
    return CachedReference({fp: _load_table(path) for fp, path in caches.items()})


def _cache_key(cfg: TrainConfig, pairs: TokenizedPairs) -> str:
    parts = ["ref-v2", model_fingerprint(reference_path(cfg)), pairs.fingerprint, cfg.precision]
    if cfg.lora_adapter is not None:  # the reference is base + the starting adapter
        parts.append(adapter_fingerprint(cfg.lora_adapter))
    if cfg.lora_quantize is not None:  # QLoRA: the reference is the quantized base
        parts.append(cfg.lora_quantize)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


@torch.no_grad()
def _precompute(source: LiveReference, cfg: TrainConfig, pairs: TokenizedPairs, target: Path, pad_id: int,
                parallel: Parallel) -> None:
    """One pass over `pairs`, split over the data-parallel ranks (data.rank_shares); each data-parallel group
    writes its rows once (its sequence-parallel rank 0: the S ranks hold the same whole-sequence log-probs),
    rank 0 publishes the directory once all are written."""
    tmp = target.with_name(target.name + ".tmp")
    if parallel.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    rows, logps = [], []
    slots = pairs.sequences_per_example()
    for mine in rank_shares(len(pairs), cfg.micro_batch_size, parallel):
        scored = source.logps(MicroBatch.of(pairs, mine or [0], pad_id, cfg.padding_free)).float().cpu()
        if mine:
            rows += mine
            logps.append(scored.reshape(slots, len(mine)).T)  # [examples, slots]
    if parallel.sequence_parallel_rank == 0:
        save_file({"rows": torch.tensor(rows, dtype=torch.int64),
                   "logps": torch.cat(logps) if logps else torch.zeros(0, slots)},
                  str(tmp / f"rank-{parallel.data_parallel_rank:05d}-of-{parallel.data_parallel_size:05d}.safetensors"))
    parallel.barrier()
    if parallel.is_main:
        (tmp / "complete.json").write_text(json.dumps({"examples": len(pairs), "sequences": slots,
                                                      "ranks": parallel.data_parallel_size}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        logger.info("reference log-probs of %d pairs written to %s", len(pairs), target)
    parallel.barrier()


def _load_table(path: Path) -> torch.Tensor:
    complete = json.loads((path / "complete.json").read_text())
    table = torch.full((complete["examples"], complete["sequences"]), float("nan"))
    for shard in sorted(path.glob("rank-*.safetensors")):
        part = load_file(str(shard))
        table[part["rows"]] = part["logps"]
    if torch.isnan(table).any():
        raise RuntimeError(f"{path}: reference log-probs missing for some pairs; delete the directory to recompute")
    return table
