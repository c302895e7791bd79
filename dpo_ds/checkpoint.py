"""Resumable checkpoints that never lie.

Layout under `<output_dir>/checkpoints/`:

    step-00000120/                 one checkpoint, complete or absent
        ds/                        DeepSpeed state of every rank at the run's ZeRO stage (engine.save_checkpoint);
                                   trainable parameters only (a LoRA run's frozen base is not saved)
        ds_universal/              added when a run resumes it at another world size or ZeRO stage
                                   (universal_resume; not in the manifest)
        hf/                        model config, generation config, tokenizer (+ adapter_config.json for LoRA):
                                   `dpo-ds convert` needs nothing else (LoRA: the base model's directory too)
        rng/rank-00000.safetensors RNG states of each rank (tensors, no pickle)
        trainer_state.json         step, sampler position, world size, fingerprints, the run config
        manifest.json              every file above with its size and xxh3-128 digest, written last
    latest                         name of the newest complete checkpoint, replaced atomically

A checkpoint is written as `step-N.tmp/` and renamed to `step-N/` only after every rank has finished
writing and hashing its own files and the manifest is on disk; `latest` is updated after the rename and old
checkpoints are pruned after that. A kill at any moment therefore leaves the previous good checkpoint or the
new one. A write that fails on any rank is agreed on by every rank before any of them waits for another, so
the run stops at once with the failing file named. Loading checks the manifest first (every rank the files
it wrote, in parallel), so a truncated, missing or altered file is reported by name instead of half-loading,
and `resume_from: auto` falls back to the newest checkpoint that verifies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import xxhash
from safetensors.torch import load_file, save_file

from dpo_ds import universal_resume
from dpo_ds.durable import fsync_tree, write_text_atomic
from dpo_ds.errors import CheckpointError, describe_error
from dpo_ds.hf_dir import ConfigOverride, saved_config, write_hf_metadata
from dpo_ds.losses import OBJECTIVE_FIELDS, PARAMS
from dpo_ds.lora import save_adapter_config
from dpo_ds.parallel import Parallel
from launcher.dist import all_reduce, gather_objects

logger = logging.getLogger("dpo_ds")

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
HF_METADATA = "hf"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"

# Config fields whose change makes a resumed run a different run (data order, objective, numerics).
RESUME_SENSITIVE_FIELDS = ("model_name_or_path", "ref_model_name_or_path", *OBJECTIVE_FIELDS, "reference_free", "max_length",
                           "max_prompt_length", "max_tokens_per_micro_batch", "shuffle", "group_by_length", "seed", "precision", "lr_scheduler",
                           "warmup_steps", "learning_rate", "weight_decay", "disable_dropout", "router_aux_loss_coef",
                           "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_adapter", "lora_quantize")


HASH = "xxh3_128"  # ~6.7 GB/s on one core (BENCHMARKS.md, section 12): hashing costs far less than writing
HASH_BLOCK = 8 << 20
_RANK_IN_NAME = re.compile(r"rank[_-]0*(\d+)")  # DeepSpeed's zero_pp_rank_R_..., mp_rank_00_...; our rng/rank-R
# Checkpoints this process wrote or verified: pruning counts only these (see _prune).
_verified: set[str] = set()


@dataclass
class TrainerState:
    step: int                    # optimizer steps completed
    sampler: dict[str, int]      # epoch, step_in_epoch, consumed_pairs
    world_size: int
    pairs_per_step: int
    data_fingerprint: str
    model_fingerprint: str
    config: dict[str, Any]
    loss_state: dict[str, dict] = field(default_factory=dict)  # losses.Objective.state_dict(): reduced over ranks
    zero_stage: int = 3          # the policy engine's ZeRO stage (checkpoints from before zero_stage: 3)

    def needs_universal(self, world_size: int, zero_stage: int) -> bool:
        """Resuming with a ZeRO-`zero_stage` policy engine on `world_size` ranks goes through the universal format
        (universal_resume): the stage changed, or the world size did and the saved optimizer state is partitioned
        over the ranks (every stage but 0, where each rank holds it all, in fp32 and bf16 alike)."""
        return self.zero_stage != zero_stage or (self.world_size != world_size and self.zero_stage != 0)

    def deepspeed_loads_universal(self, world_size: int, zero_stage: int) -> bool:
        """Resuming goes through the universal format and DeepSpeed loads it (the engine's DeepSpeed config sets
        checkpoint.load_universal): it does into ZeRO stages 1-3 only; a stage-0 engine is restored by
        universal_resume.load_into_whole_engine."""
        return self.needs_universal(world_size, zero_stage) and zero_stage > 0


def model_fingerprint(path: str) -> str:
    """Digest of a model directory's config and weight files (names and sizes): cheap, and it changes when
    the model does."""
    p = Path(path)
    h = hashlib.sha256()
    if (p / "config.json").is_file():
        h.update((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:24]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a collective: all ranks must call it)."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), "max").item())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path) -> None:
    state = load_file(str(path))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def save_checkpoint(engine, output_dir: str, state: TrainerState, parallel: Parallel, save_total_limit: int = 0,
                    tokenizer=None, config_overrides: Sequence[ConfigOverride] = (), adapter_config=None) -> Path:
    """Write checkpoint `step-N` atomically (every rank calls this). Raises CheckpointError on any rank's
    write failure, after removing the partial directory; earlier checkpoints are never touched then.
    `config_overrides`: what the run changed in the model's config (undone in hf/config.json);
    `adapter_config`: a LoRA run's peft config (hf/adapter_config.json marks the checkpoint as LoRA)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{state.step:08d}"
    tmp = root / f"step-{state.step:08d}.tmp"
    rank = parallel.rank
    if parallel.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "rng").mkdir()
    parallel.barrier()
    errors: list[BaseException] = []
    digests: dict[str, str] = {}
    try:
        with _write_errors_recorded(engine, errors):
            # frozen parameters (a LoRA run's base) are rebuilt from their files on resume, never saved
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True,
                                   client_state=universal_resume.checkpoint_client_state(engine))
        if not errors:
            save_file(_rng_state(), str(tmp / "rng" / f"rank-{rank:05d}.safetensors"))  # as _files_of_rank names it
            digests = {rel: file_digest(tmp / rel) for rel in _files_of_rank(tmp, rank, parallel.world_size)}
    except (OSError, RuntimeError) as err:
        errors.append(err)
    _fail_together(errors[0] if errors else None, tmp, final, parallel)
    digests = {rel: digest for part in gather_objects(digests) for rel, digest in part.items()}
    failure = parallel.on_rank0(f"publishing checkpoint {final}", lambda: _publish(
        engine, tmp, final, root, state, save_total_limit, tokenizer, config_overrides, adapter_config, digests))
    if failure is not None:
        raise CheckpointError(failure)
    _verified.add(final.name)
    if parallel.is_main:
        logger.info("checkpoint written: %s", final)
    return final


class _write_errors_recorded:
    """While DeepSpeed saves: a rank whose file write fails records the error and writes nothing more instead
    of raising, so it still reaches DeepSpeed's closing barrier with the others and the failure is agreed on
    afterwards (`_fail_together`); raised there, one rank would wait in DeepSpeed's barrier and the other in
    ours until dist_timeout_s. Files are written through a Python file object, so disk full surfaces as
    OSError(ENOSPC) naming the file rather than as a RuntimeError of torch's zip writer."""

    def __init__(self, engine, errors: list[BaseException]):
        self.engine, self.errors = engine, errors

    def __enter__(self):
        checkpoint_engine = self.engine.checkpoint_engine
        original = checkpoint_engine.save

        def save(state_dict, path):
            if self.errors:
                return
            try:
                with open(path, "wb") as fh:
                    original(state_dict, fh)
            except OSError as err:
                self.errors.append(err if err.filename else OSError(err.errno, err.strerror, str(path)))
            except RuntimeError as err:
                self.errors.append(err)

        checkpoint_engine.save = save
        return self

    def __exit__(self, *exc):
        del self.engine.checkpoint_engine.save  # back to the class's method
        return False


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb", buffering=0) as fh:
        while block := fh.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _owner(rel: str, world_size: int) -> int:
    """The rank that hashes a checkpoint file at save and checks it at load: the rank in its name (the rank
    that wrote it, so the file is still in that rank's page cache), rank 0 for files without one."""
    match = _RANK_IN_NAME.search(Path(rel).name)
    return int(match.group(1)) % world_size if match else 0


def _files_of_rank(tmp: Path, rank: int, world_size: int) -> list[str]:
    """The files this rank hashes: its own under ds/ (DeepSpeed's save_checkpoint ends in a barrier, so every
    rank's are complete) and its RNG file. rng/ is not listed: another rank may still be writing there, through
    a temporary file without a rank in its name (safetensors writes atomically)."""
    ds = [str(p.relative_to(tmp)) for p in sorted((tmp / DS_TAG).rglob("*")) if p.is_file()]
    return [rel for rel in ds if _owner(rel, world_size) == rank] + [f"rng/rank-{rank:05d}.safetensors"]


def _publish(engine, tmp: Path, final: Path, root: Path, state: TrainerState, save_total_limit: int,
             tokenizer, config_overrides: Sequence[ConfigOverride], adapter_config,
             digests: dict[str, str]) -> str | None:
    """Rank 0, once every rank's files are in `tmp` and hashed (`digests`): metadata, state, manifest, rename,
    `latest`, pruning. Returns None, or on failure what went wrong (every rank raises it) after removing the
    partial directory; the previous checkpoint and `latest` are untouched."""
    try:
        model = engine.module
        write_hf_metadata(tmp / HF_METADATA, saved_config(model, config_overrides),
                          getattr(model, "generation_config", None), tokenizer)
        if adapter_config is not None:
            save_adapter_config(adapter_config, tmp / HF_METADATA)
        write_text_atomic(tmp / STATE, json.dumps(asdict(state), indent=2))
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                rel = str(path.relative_to(tmp))
                files[rel] = {"size": path.stat().st_size, HASH: digests.get(rel) or file_digest(path)}
        fsync_tree(tmp)
        write_text_atomic(tmp / MANIFEST, json.dumps({"hash": HASH, "files": files}, indent=2))
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        _prune(root, save_total_limit, keep=final.name)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{describe_error(err)} (publishing checkpoint {final.name}; {_kept(root)})"
    return None


def _kept(root: Path) -> str:
    latest = root / LATEST
    if latest.is_file():
        return f"removed; checkpoints/latest still names {latest.read_text().strip()}"
    return "removed; the run has no earlier checkpoint"


def _fail_together(error: BaseException | None, tmp: Path, final: Path, parallel: Parallel) -> None:
    """Collective: every rank says whether its writes succeeded; if any failed, every rank raises the same
    error (the first failing rank's, naming its file; none waits at a later barrier) and the partial
    directory goes. The previous checkpoint and `latest` are untouched."""
    reports = gather_objects(None if error is None else describe_error(error))
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if not failed:
        return
    if parallel.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    rank, text = failed[0]
    raise CheckpointError(f"{text} (rank {rank}, writing checkpoint {final.name}; {_kept(final.parent)})") from error


def _prune(root: Path, save_total_limit: int, keep: str) -> None:
    """Keep the newest `save_total_limit` checkpoints this process wrote or verified (0 = keep all); remove
    stale .tmp dirs. A checkpoint it never verified (one a fallback skipped, say) does not count towards the
    limit, so the last good checkpoint is never removed in its favour; it goes once it is older than all kept."""
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if save_total_limit <= 0:
        return
    complete = _complete_checkpoints(root)
    kept = [p for p in complete if p.name in _verified or p.name == keep][-save_total_limit:]
    for old in complete:
        if old not in kept and (old.name in _verified or old < kept[0]):
            shutil.rmtree(old, ignore_errors=True)


def _complete_checkpoints(root: Path) -> list[Path]:
    """step-N directories (not .tmp), oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _manifest_entries(ckpt: Path) -> dict[str, dict[str, Any]]:
    """file -> {"size": bytes[, HASH: digest]} from the manifest (manifests before issue 24 held sizes only)."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint ({MANIFEST} missing)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{manifest}: unreadable ({err})") from err
    return {rel: entry if isinstance(entry, dict) else {"size": entry} for rel, entry in files.items()}


def checkpoint_problems(ckpt: Path, checksums: bool = True, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with the files of `ckpt` that `rank` of `world_size` checks (all of them for 0 of 1):
    missing, another size, or (with `checksums`) contents that no longer match the manifest's digest."""
    try:
        entries = _manifest_entries(ckpt)
    except CheckpointError as err:
        return [str(err)]
    problems = []
    for rel, entry in entries.items():
        if _owner(rel, world_size) != rank:
            continue
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{path}: missing from checkpoint {ckpt}")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: truncated or altered ({path.stat().st_size} bytes, expected {entry['size']})")
        elif checksums and HASH in entry and file_digest(path) != entry[HASH]:
            problems.append(f"{path}: contents altered (same size, {HASH} digest differs from the manifest's)")
    return problems


def verify_checkpoint(ckpt: Path, checksums: bool = True) -> TrainerState:
    """Check every file the manifest lists (present, its size, its digest unless `checksums` is False) in
    this process; return the trainer state."""
    problems = checkpoint_problems(ckpt, checksums)
    if problems:
        raise CheckpointError("; ".join(problems))
    return TrainerState(**json.loads((ckpt / STATE).read_text()))


def verify_together(ckpt: Path, parallel: Parallel) -> list[str]:
    """Collective: every rank checks its share of `ckpt`'s files (the ones it wrote), in parallel; every rank
    gets every problem found."""
    mine = checkpoint_problems(ckpt, True, parallel.rank, parallel.world_size)
    return list(dict.fromkeys(problem for part in gather_objects(mine) for problem in part))


def find_checkpoint(output_dir: str, resume_from: str | None, parallel: Parallel, repair: bool = True) -> Path | None:
    """The checkpoint to resume from, verified on every rank. `auto`: the one `latest` names, else the newest
    older one that verifies (with a warning naming what was wrong; `latest` is repaired to name it unless `repair`
    is off, as for `train --check`), None when the run has none. A given path that fails names the newest
    checkpoint beside it that verifies."""
    if not resume_from:
        return None
    if resume_from != "auto":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"resume_from: {path} is not a directory")
        problems = verify_together(path, parallel)
        if problems:
            good = _newest_good(_complete_checkpoints(path.parent), path, parallel)
            raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems) + (
                f". The newest checkpoint beside it that verifies is {good}" if good else
                ". No checkpoint beside it verifies"))
        _verified.add(path.name)
        return path
    root = Path(output_dir) / CHECKPOINTS_DIR
    latest = root / LATEST
    # the checkpoint `latest` names and older ones: a newer directory was never published by `latest`
    named = latest.read_text().strip() if latest.is_file() else None
    candidates = [p for p in reversed(_complete_checkpoints(root)) if named is None or p.name <= named]
    if named is not None and not (root / named).is_dir():
        skipped = [f"{latest} names {named}, which does not exist"]
    else:
        skipped = []
    for candidate in candidates:
        problems = verify_together(candidate, parallel)
        if not problems:
            break
        skipped.append("; ".join(problems))
    else:
        if skipped:
            raise CheckpointError("no checkpoint to resume from verifies: " + "; ".join(skipped))
        return None
    if skipped and parallel.is_main:
        logger.warning("%s; resuming from %s, the newest checkpoint that verifies (%s)", "; ".join(skipped), candidate,
                       "checkpoints/latest now names it" if repair else "train will make checkpoints/latest name it")
        if repair:
            write_text_atomic(latest, candidate.name)
    _verified.add(candidate.name)
    return candidate


def _newest_good(checkpoints: list[Path], skip: Path, parallel: Parallel) -> Path | None:
    """The newest of `checkpoints` (besides `skip`) whose files all verify (collective)."""
    for candidate in reversed(checkpoints):
        if candidate.resolve() != skip.resolve() and not verify_together(candidate, parallel):
            return candidate
    return None


def resume_point(output_dir: str, resume_from: str | None, current: TrainerState, ignore_mismatch: bool,
                 parallel: Parallel) -> tuple[Path | None, TrainerState | None]:
    """(checkpoint dir, its trainer state) to resume from, or (None, None) to start fresh; verified, checked
    against the current run, and converted to the universal format when the world size or the ZeRO stage changed."""
    ckpt = find_checkpoint(output_dir, resume_from, parallel)
    if ckpt is None:
        return None, None
    saved = TrainerState(**json.loads((ckpt / STATE).read_text()))
    problems = check_compatible(saved, current)
    if problems and not ignore_mismatch:
        raise CheckpointError(f"cannot resume from {ckpt}: " + "; ".join(problems)
                              + " (pass --resume_ignore_mismatch true to resume anyway)")
    if saved.needs_universal(current.world_size, current.zero_stage):
        universal_resume.prepare(ckpt / DS_TAG, ckpt / UNIVERSAL_TAG, saved.zero_stage, parallel)
    return ckpt, saved


def check_compatible(saved: TrainerState, current: TrainerState) -> list[str]:
    """Human-readable differences that make resuming `saved` as `current` a different run."""
    problems = []
    if saved.data_fingerprint != current.data_fingerprint:
        problems.append(f"the training data changed (fingerprint {saved.data_fingerprint} at save, "
                        f"{current.data_fingerprint} now: different file contents, tokenizer or tokenization settings)")
    if saved.model_fingerprint != current.model_fingerprint:
        problems.append(f"the model changed (fingerprint {saved.model_fingerprint} at save, {current.model_fingerprint} now)")
    if saved.pairs_per_step != current.pairs_per_step:
        problems.append(f"pairs per optimizer step changed ({saved.pairs_per_step} at save, {current.pairs_per_step} now; "
                        f"keep micro_batch_size x gradient_accumulation_steps x ranks equal)")
    for name in RESUME_SENSITIVE_FIELDS:
        # a loss parameter added since the checkpoint was written had its default then
        at_save = saved.config.get(name, PARAMS[name].default if name in PARAMS else None)
        if at_save != current.config.get(name):
            problems.append(f"field '{name}' changed ({at_save!r} at save, {current.config.get(name)!r} now)")
    return problems


def load_checkpoint(engine, ckpt: Path, saved: TrainerState, parallel: Parallel, adapter_only: bool = False) -> None:
    """Restore the policy engine's state (from the universal format when the world size or the ZeRO stage changed)
    and this rank's RNG. `adapter_only`: a LoRA run's checkpoint, which holds the adapter only."""
    stage = engine.zero_optimization_stage()
    universal = saved.needs_universal(parallel.world_size, stage)
    if universal and not saved.deepspeed_loads_universal(parallel.world_size, stage):
        universal_resume.load_into_whole_engine(engine, ckpt / UNIVERSAL_TAG)
    else:
        tag = UNIVERSAL_TAG if universal else DS_TAG
        groups_as_built = [dict(group) for group in engine.basic_optimizer.param_groups]
        # a LoRA checkpoint holds the adapter only: the frozen base is already loaded from its files
        load_path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=not adapter_only,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{ckpt / tag}: DeepSpeed could not load this checkpoint")
        if universal:
            universal_resume.repair_optimizer_state(engine.optimizer, groups_as_built)
    rng = ckpt / "rng" / f"rank-{parallel.rank:05d}.safetensors"
    if rng.is_file():
        _restore_rng(rng)
