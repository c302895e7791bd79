"""Resumable checkpoints that never lie.

Layout under `<output_dir>/checkpoints/`:

    step-00000120/                 one checkpoint, complete or absent
        ds/                        DeepSpeed ZeRO-3 state of every rank (engine.save_checkpoint); trainable
                                   parameters only (a LoRA run's frozen base is not saved)
        hf/                        model config, generation config, tokenizer (+ adapter_config.json for LoRA):
                                   `dpo-ds convert` needs nothing else (LoRA: the base model's directory too)
        rng/rank-00000.safetensors RNG states of each rank (tensors, no pickle)
        trainer_state.json         step, sampler position, world size, fingerprints, the run config
        manifest.json              every file above with its size, written last
    latest                         name of the newest complete checkpoint, replaced atomically

A checkpoint is written as `step-N.tmp/` and renamed to `step-N/` only after every rank has finished
writing and the manifest is on disk; `latest` is updated after the rename and old checkpoints are pruned
after that. A kill at any moment therefore leaves the previous good checkpoint or the new one. Loading
checks the manifest first, so a truncated or missing file is reported by name instead of half-loading.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from dpo_ds.errors import UsageError
from dpo_ds.hf_dir import ConfigOverride, saved_config, write_hf_metadata
from dpo_ds.losses import OBJECTIVE_FIELDS, PARAMS
from dpo_ds.lora import save_adapter_config
from dpo_ds.parallel import Parallel
from launcher.dist import all_reduce

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


class CheckpointError(UsageError, RuntimeError):
    pass


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


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    error: BaseException | None = None
    try:
        # frozen parameters (a LoRA run's base) are rebuilt from their files on resume, never saved
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        save_file(_rng_state(), str(tmp / "rng" / f"rank-{rank:05d}.safetensors"))
    except (OSError, RuntimeError) as err:
        error = err
    _fail_together(error, tmp, f"writing checkpoint {final}", parallel)
    parallel.on_rank0(f"publishing checkpoint {final}", lambda: _publish(engine, tmp, final, root, state, save_total_limit,
                                                                  tokenizer, config_overrides, adapter_config),
             CheckpointError)
    if parallel.is_main:
        logger.info("checkpoint written: %s", final)
    return final


def _publish(engine, tmp: Path, final: Path, root: Path, state: TrainerState, save_total_limit: int,
             tokenizer, config_overrides: Sequence[ConfigOverride], adapter_config) -> None:
    """Rank 0, once every rank's files are in `tmp`: metadata, state, manifest, rename, `latest`, pruning.
    On failure the partial directory goes; the previous checkpoint and `latest` are untouched."""
    try:
        model = engine.module
        write_hf_metadata(tmp / HF_METADATA, saved_config(model, config_overrides),
                          getattr(model, "generation_config", None), tokenizer)
        if adapter_config is not None:
            save_adapter_config(adapter_config, tmp / HF_METADATA)
        _write_text_atomic(tmp / STATE, json.dumps(asdict(state), indent=2))
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _fsync_tree(tmp)
        _write_text_atomic(tmp / MANIFEST, json.dumps({"files": files}, indent=2))
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name)
        _prune(root, save_total_limit, keep=final.name)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"publishing checkpoint {final} failed ({err}); the previous checkpoint is kept") from err


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fail_together(error: BaseException | None, tmp: Path, what: str, parallel: Parallel) -> None:
    """Collective: if any rank failed, every rank raises (none waits at a later barrier) and the partial
    directory goes; the previous checkpoint and `latest` are untouched."""
    if any_rank(error is not None):
        if parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{what} failed ({error or 'on another rank'}); the previous checkpoint is kept") from error


def _prune(root: Path, save_total_limit: int, keep: str) -> None:
    """Keep the newest `save_total_limit` complete checkpoints (0 = keep all); remove stale .tmp dirs."""
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if save_total_limit <= 0:
        return
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-save_total_limit]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(ckpt: Path) -> TrainerState:
    """Check every file the manifest lists is present with its size; return the trainer state."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint ({MANIFEST} missing)")
    for rel, size in json.loads(manifest.read_text())["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint {ckpt}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: truncated or altered ({path.stat().st_size} bytes, expected {size})")
    return TrainerState(**json.loads((ckpt / STATE).read_text()))


def find_checkpoint(output_dir: str, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` = the one `latest` names (None when the run has none yet)."""
    if not resume_from:
        return None
    if resume_from != "auto":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"resume_from: {path} is not a directory")
        return path
    latest = Path(output_dir) / CHECKPOINTS_DIR / LATEST
    if not latest.is_file():
        return None
    return latest.parent / latest.read_text().strip()


def refuse_to_overwrite(output_dir: str, resume_from: str | None) -> None:
    """A fresh start (no resume_from) in a folder that holds a run's checkpoints is refused."""
    if resume_from is None and (Path(output_dir) / CHECKPOINTS_DIR / LATEST).exists():
        raise CheckpointError(f"{output_dir} already holds checkpoints of a run: pass --resume_from auto to "
                              f"continue it, or choose another output_dir")


def resume_point(output_dir: str, resume_from: str | None, current: TrainerState, ignore_mismatch: bool,
                 parallel: Parallel) -> tuple[Path | None, TrainerState | None]:
    """(checkpoint dir, its trainer state) to resume from, or (None, None) to start fresh; verified, checked
    against the current run, and converted to the universal format when the world size changed."""
    refuse_to_overwrite(output_dir, resume_from)
    ckpt = find_checkpoint(output_dir, resume_from)
    if ckpt is None:
        return None, None
    saved = verify_checkpoint(ckpt)
    problems = check_compatible(saved, current)
    if problems and not ignore_mismatch:
        raise CheckpointError(f"cannot resume from {ckpt}: " + "; ".join(problems)
                              + " (pass --resume_ignore_mismatch true to resume anyway)")
    if saved.world_size != current.world_size:
        prepare_universal(ckpt, parallel)
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


def prepare_universal(ckpt: Path, parallel: Parallel) -> None:
    """Convert the ZeRO checkpoint to DeepSpeed's universal format (rank 0, once) for another world size."""
    target = ckpt / UNIVERSAL_TAG

    def convert() -> None:
        if target.is_dir():
            return
        tmp = ckpt / (UNIVERSAL_TAG + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / DS_TAG),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        logger.info("converting %s to a universal checkpoint for a new world size", ckpt)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"{ckpt}: universal conversion failed:\n{proc.stderr[-3000:]}")
        os.replace(tmp, target)

    parallel.on_rank0(f"converting {ckpt} to a universal checkpoint", convert, CheckpointError)


def load_checkpoint(engine, ckpt: Path, saved: TrainerState, parallel: Parallel, adapter_only: bool = False) -> None:
    """Restore DeepSpeed state (universal when the world size changed) and this rank's RNG. `adapter_only`: a
    LoRA run's checkpoint, which holds the adapter only."""
    universal = saved.world_size != parallel.world_size
    tag = UNIVERSAL_TAG if universal else DS_TAG
    groups_as_built = [dict(group) for group in engine.optimizer.optimizer.param_groups]
    # a LoRA checkpoint holds the adapter only: the frozen base is already loaded from its files
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=not adapter_only,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{ckpt / tag}: DeepSpeed could not load this checkpoint")
    if universal:
        repair_universal_optimizer_state(engine.optimizer, groups_as_built)
    rng = ckpt / "rng" / f"rank-{parallel.rank:05d}.safetensors"
    if rng.is_file():
        _restore_rng(rng)


def repair_universal_optimizer_state(zero_optimizer, groups_as_built: list[dict[str, Any]]) -> None:
    """Undo two defects of DeepSpeed's ZeRO-3 universal-checkpoint load (checked in deepspeed 0.19.8,
    `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`) that make a run resumed
    at another world size drift from the run it continues (issue 15):

    - every sub-group's Adam state receives the same `step` tensor object. torch's AdamW (fused or foreach)
      increments `step` in place and DeepSpeed steps one sub-group at a time, so with two sub-groups (our decay
      and no-decay groups) the shared count advances twice per optimizer step and the bias correction of every
      update after the resume is wrong;
    - every param group receives param group 0's hyperparameters, so the no-decay group (norms, biases) is
      decayed with weight_decay > 0.

    Each sub-group gets its own copy of the step count, and the hyperparameters that differ between our groups
    are set back to the values this run built them with (the resume check has verified that the fields they
    come from did not change). Both repairs are no-ops on a state that is already right."""
    torch_optimizer = zero_optimizer.optimizer
    for flat in zero_optimizer.fp32_partitioned_groups_flat:
        state = torch_optimizer.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    per_group = {key for key in groups_as_built[0] if key != "params"
                 and any(group.get(key) != groups_as_built[0][key] for group in groups_as_built)}
    for group, built in zip(torch_optimizer.param_groups, groups_as_built):
        for key in per_group:
            group[key] = built[key]


class StopSignal:
    """Remembers SIGTERM/SIGUSR1/SIGINT so the trainer can checkpoint at the next step boundary and exit.

    Ctrl-C (SIGINT) does the same; a second one aborts at once, without a checkpoint. A SIGINT within
    REPEAT_WINDOW_S of the first is the same Ctrl-C: the terminal sends it to torchrun's workers and torchrun
    forwards its own copy to them."""
    REPEAT_WINDOW_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self._interrupted_at: float | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None:
                if now - self._interrupted_at > self.REPEAT_WINDOW_S:
                    os.write(2, b"second interrupt: stopping now, without a checkpoint\n")
                    os._exit(130)
                return
            self._interrupted_at = now
        self.received = signum
        logger.warning("received %s: checkpointing at the end of this step%s", signal.Signals(signum).name,
                       " (Ctrl-C again to stop at once, without a checkpoint)" if signum == signal.SIGINT else "")
