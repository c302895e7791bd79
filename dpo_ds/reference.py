"""Reference sources: where log pi_ref of a micro-batch comes from. The trainer never asks which it has.

- `LiveReference`: a frozen ZeRO-3 inference engine, run on every micro-batch.
- `CachedReference` (`precompute_ref: true`): one pass of that engine over the train and eval pairs before
  training, written to disk sharded by rank under `caches/ref-<fingerprint>/`, keyed by the reference model,
  the data fingerprint (file, tokenizer, template, max_length, truncation) and the precision, and reused by
  later runs. Training then runs no reference forward, and the engine is gone before the policy is built.
- `NoReference`: log pi_ref = 0 (SimPO, SFT, `reference_free`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpo_ds.config import TrainConfig, uses_reference
from dpo_ds.data import TokenizedPairs, collate, rank_shares
from dpo_ds.engines import (
    attention_kernel,
    build_inference_engine,
    forward_logps,
    model_dtype,
    release_engine,
    resolve_reference_config,
)
from launcher.dist import barrier

logger = logging.getLogger("dpo_ds")


class LiveReference:
    """Reference log-probs from a ZeRO-3 inference engine, recomputed for every micro-batch."""

    def __init__(self, engine, chunk_size: int, fused: bool):
        self.engine = engine
        self.chunk_size = chunk_size
        self.fused = fused

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], pairs: TokenizedPairs, indices: list[int]) -> torch.Tensor:
        return forward_logps(self.engine, batch, self.chunk_size, self.fused)[0]


class NoReference:
    """log pi_ref = 0: reference-free losses build no reference engine."""

    def logps(self, batch: dict[str, torch.Tensor], pairs: TokenizedPairs, indices: list[int]) -> torch.Tensor:
        return torch.zeros(batch["input_ids"].shape[0])


class CachedReference:
    """Precomputed reference log-probs, one [N, 2] (chosen, rejected) table per dataset fingerprint."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def logps(self, batch: dict[str, torch.Tensor], pairs: TokenizedPairs, indices: list[int]) -> torch.Tensor:
        table = self.tables[pairs.fingerprint]
        rows = torch.as_tensor(indices)
        return torch.cat([table[rows, 0], table[rows, 1]])


def reference_path(cfg: TrainConfig) -> str:
    return cfg.ref_model_name_or_path or cfg.model_name_or_path


def _reference_engine(cfg: TrainConfig, hidden_size: int):
    return build_inference_engine(reference_path(cfg), resolve_reference_config(cfg, hidden_size), model_dtype(cfg),
                                  cfg.trust_remote_code, cfg.weights_loader, attention_kernel(cfg), cfg)


def build_reference(cfg: TrainConfig, hidden_size: int, datasets: list[TokenizedPairs] = (), cache_dir: str | None = None,
                    pad_id: int = 0, rank: int = 0, world_size: int = 1):
    """The reference source the loss needs. With precompute_ref, every dataset's table is computed (or read
    from the cache) now; call it before building the policy so both engines never hold memory together."""
    if not uses_reference(cfg):
        return NoReference()
    if not cfg.precompute_ref:
        engine = _reference_engine(cfg, hidden_size)
        return LiveReference(engine, cfg.logprob_chunk_size, cfg.fused_lm_head)
    caches = {pairs.fingerprint: Path(cache_dir) / f"ref-{_cache_key(cfg, pairs)}" for pairs in datasets}
    missing = [pairs for pairs in datasets if not (caches[pairs.fingerprint] / "complete.json").is_file()]
    if missing:
        engine = _reference_engine(cfg, hidden_size)
        for pairs in missing:
            _precompute(engine, cfg, pairs, caches[pairs.fingerprint], pad_id, rank, world_size)
        release_engine(engine)
    elif rank == 0:
        logger.info("reference log-probs read from %s", ", ".join(str(p) for p in caches.values()))
    return CachedReference({fp: _load_table(path) for fp, path in caches.items()})


def _cache_key(cfg: TrainConfig, pairs: TokenizedPairs) -> str:
    from dpo_ds.checkpoint import model_fingerprint

    parts = ["ref-v1", model_fingerprint(reference_path(cfg)), pairs.fingerprint, cfg.precision]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


@torch.no_grad()
def _precompute(engine, cfg: TrainConfig, pairs: TokenizedPairs, target: Path, pad_id: int, rank: int,
                world_size: int) -> None:
    """One pass over `pairs`, split over ranks (data.rank_shares); each rank writes its rows, rank 0 publishes
    the directory once all are written."""
    tmp = target.with_name(target.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rows, chosen, rejected = [], [], []
    for mine in rank_shares(len(pairs), cfg.micro_batch_size, rank, world_size):
        batch = collate(pairs, mine or [0], pad_id, packed=cfg.padding_free)
        logps = forward_logps(engine, batch, cfg.logprob_chunk_size, cfg.fused_lm_head)[0].float().cpu()
        if mine:
            rows += mine
            chosen.append(logps[: len(mine)])
            rejected.append(logps[len(mine):])
    save_file({"rows": torch.tensor(rows, dtype=torch.int64),
               "chosen": torch.cat(chosen) if chosen else torch.zeros(0),
               "rejected": torch.cat(rejected) if rejected else torch.zeros(0)},
              str(tmp / f"rank-{rank:05d}-of-{world_size:05d}.safetensors"))
    barrier()
    if rank == 0:
        (tmp / "complete.json").write_text(json.dumps({"pairs": len(pairs), "ranks": world_size}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        logger.info("reference log-probs of %d pairs written to %s", len(pairs), target)
    barrier()


def _load_table(path: Path) -> torch.Tensor:
    n = json.loads((path / "complete.json").read_text())["pairs"]
    table = torch.full((n, 2), float("nan"))
    for shard in sorted(path.glob("rank-*.safetensors")):
        part = load_file(str(shard))
        table[part["rows"], 0] = part["chosen"]
        table[part["rows"], 1] = part["rejected"]
    if torch.isnan(table).any():
        raise RuntimeError(f"{path}: reference log-probs missing for some pairs; delete the directory to recompute")
    return table
