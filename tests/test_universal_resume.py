"""universal_resume in one process: a stage-0 checkpoint (fp32: torch AdamW's state; bf16: DeepSpeed's FP16_Optimizer
wrapper) written to the universal layout and loaded into a freshly built stage-0 optimizer continues exactly as the
optimizer that never stopped; what DeepSpeed's universal load leaves wrong is repaired; which resumes go through
the universal layout. The stage 1-3 sides (ds_to_universal, DeepSpeed's loaders) are tested by the runs of
tests/test_checkpoint.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.runtime.fp16 import unfused_optimizer
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

from helpers import tiny_causal_lm

from dpo_ds import universal_resume
from dpo_ds.checkpoint import TrainerState
from dpo_ds.engines.lifecycle import _optimizer_groups, lr_scheduler
from dpo_ds.errors import CheckpointError


class WholeEngine:
    """The slice of a stage-0 DeepSpeedEngine that universal_resume reads and restores."""

    def __init__(self, seed: int, kind: str):
        self.module = tiny_causal_lm(seed=seed).train()
        if kind != "fp32":
            self.module.to(torch.bfloat16)
        adamw = torch.optim.AdamW(_optimizer_groups(self.module, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.99))
        # bf16 at stage 0: DeepSpeed's wrapper around torch's AdamW (one fp32 master copy per parameter), or around
        # a fused optimizer (one flat fp32 master copy per group)
        wrappers = {"fp32": None, "bf16": unfused_optimizer.FP16_UnfusedOptimizer, "bf16-flat": FP16_Optimizer}
        wrapper = wrappers[kind]
        self.optimizer = adamw if wrapper is None else wrapper(adamw, low_precision_dtype=torch.bfloat16, verbose=False)
        self.lr_scheduler = lr_scheduler("cosine", 1, 10)(adamw)
        self.global_steps = self.skipped_steps = self.global_samples = 0

    def zero_optimization_stage(self) -> int:
        return 0

    def train_batch_size(self) -> int:
        return 4

    def step(self, seed: int) -> None:
        ids = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(seed))
        self.module(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()

    def model_states(self) -> dict:
        """What DeepSpeed's save_checkpoint writes to mp_rank_00_model_states.pt at stage 0, with dpo-ds's client_state."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                "skipped_steps": 0, "global_samples": self.global_samples, "ds_version": deepspeed.__version__,
                **universal_resume.checkpoint_client_state(self)}


class OneProcess:
    def on_rank0(self, what, work, failure):
        return work()


def flat_state(engine: WholeEngine) -> list[torch.Tensor]:
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [value.float() if torch.is_tensor(value) else torch.tensor(value) for state in torch_optimizer.state.values()
            for value in state.values()] + [p.detach().float() for p in engine.module.parameters()]


@pytest.mark.parametrize("kind", ["fp32", "bf16", "bf16-flat"])
def test_stage0_checkpoint_through_universal_layout_continues_exactly(tmp_path: Path, kind: str, monkeypatch):
    # the unfused wrapper asks DeepSpeed's process group for its rank while it is built: one process, rank 0
    monkeypatch.setattr(unfused_optimizer.dist, "get_rank", lambda *args, **kwargs: 0)
    uninterrupted = WholeEngine(seed=0, kind=kind)
    for step in range(3):
        uninterrupted.step(step)
    (tmp_path / "ds").mkdir()
    torch.save(uninterrupted.model_states(), tmp_path / "ds" / universal_resume.MODEL_STATES[0])
    target = tmp_path / "ds_universal"
    universal_resume.prepare(tmp_path / "ds", target, 0, OneProcess())
    assert (target / universal_resume.COMPLETE).is_file() and not (tmp_path / "ds_universal.tmp").exists()
    name = next(n for n, _ in uninterrupted.module.named_parameters())
    saved = torch.load(target / "zero" / name / "exp_avg.pt", weights_only=False)["param"]
    assert saved.dtype == torch.float32 and saved.shape == dict(uninterrupted.module.named_parameters())[name].shape

    resumed = WholeEngine(seed=1, kind=kind)  # other initial weights, no optimizer state
    universal_resume.load_into_whole_engine(resumed, target)
    assert (resumed.global_steps, resumed.global_samples) == (3, 12)
    assert resumed.lr_scheduler.get_last_lr() == uninterrupted.lr_scheduler.get_last_lr()
    for got, want in zip(flat_state(resumed), flat_state(uninterrupted), strict=True):
        assert torch.equal(got, want)
    for step in range(3, 5):
        uninterrupted.step(step)
        resumed.step(step)
    for got, want in zip(flat_state(resumed), flat_state(uninterrupted), strict=True):
        assert torch.equal(got, want)


def test_layout_is_on_disk_before_its_mark_and_its_rename(tmp_path: Path, monkeypatch):
    """A power loss never leaves a layout that looks complete but is not: every file and directory is fsynced
    before the completion mark is, and the folder's rename is fsynced after it."""
    engine = WholeEngine(seed=0, kind="fp32")
    engine.step(0)
    (tmp_path / "ds").mkdir()
    torch.save(engine.model_states(), tmp_path / "ds" / universal_resume.MODEL_STATES[0])
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src), str(dst))), replace(src, dst)))
    target = tmp_path / "ds_universal"
    universal_resume.prepare(tmp_path / "ds", target, 0, OneProcess())

    tmp = str(tmp_path / "ds_universal.tmp")
    mark = str(tmp_path / "ds_universal.tmp" / universal_resume.COMPLETE)
    marked = events.index(("replace", mark + ".tmp", mark))
    assert ("fsync", mark + ".tmp") in events[:marked]  # the mark itself, before it is in place
    written = [tmp + "/" + str(p.relative_to(target)) for p in sorted(target.rglob("*")) if p.name != universal_resume.COMPLETE]
    assert len(written) > 10 and any(path.endswith("exp_avg.pt") for path in written)
    before_mark = {event[1] for event in events[:marked] if event[0] == "fsync"}
    assert [path for path in [tmp, *written] if path not in before_mark] == []  # files and directories alike
    renamed = events.index(("replace", tmp, str(target)))
    assert ("fsync", tmp) in events[marked:renamed]  # the mark's entry in the folder, then the rename
    assert ("fsync", str(tmp_path)) in events[renamed:]  # the rename in the parent directory


@pytest.mark.parametrize("damage, refusal", [
    ("no names", "does not record its optimizer's parameter names"),
    ("not Adam", "holds Adam's state only (step, exp_avg, exp_avg_sq), this optimizer's has momentum_buffer")])
def test_stage0_checkpoint_that_cannot_be_converted_is_refused_in_one_line(tmp_path: Path, damage: str, refusal: str):
    engine = WholeEngine(seed=0, kind="fp32")
    engine.step(0)
    states = engine.model_states()
    if damage == "no names":
        del states[universal_resume.PARAM_NAMES]
    else:
        for state in states["optimizer"]["state"].values():
            state["momentum_buffer"] = torch.zeros(1)
    (tmp_path / "ds").mkdir()
    torch.save(states, tmp_path / "ds" / universal_resume.MODEL_STATES[0])
    with pytest.raises(CheckpointError) as refused:
        universal_resume.prepare(tmp_path / "ds", tmp_path / "ds_universal", 0, OneProcess())
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "ds" / universal_resume.MODEL_STATES[0]))
    assert refusal in message and "resume it at" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing written


def test_stage_1_to_3_output_without_adam_state_is_refused_in_one_line(tmp_path: Path):
    """ds_to_universal's folder of a ZeRO checkpoint whose optimizer is not Adam (its per-parameter files have no
    exp_avg/exp_avg_sq): one line naming the checkpoint, not a FileNotFoundError halfway through."""
    folder = tmp_path / "ckpt" / "ds_universal.tmp"
    (folder / "zero" / "w").mkdir(parents=True)
    torch.save({"param_shapes": [{"w": torch.Size([2])}], universal_resume.DS_VERSION: deepspeed.__version__},
               folder / universal_resume.MODEL_STATES[0])
    torch.save({universal_resume.PARAM_GROUPS: [{"lr": 1e-3}]}, folder / "zero" / "optimizer_state.pt")
    torch.save({universal_resume.PARAM: torch.zeros(2)}, folder / "zero" / "w" / "fp32.pt")
    torch.save({universal_resume.PARAM: torch.zeros(2)}, folder / "zero" / "w" / "momentum_buffer.pt")
    with pytest.raises(CheckpointError) as refused:
        universal_resume._unify(folder)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "ckpt"))
    assert "holds Adam's state only" in message and "exp_avg, exp_avg_sq for w" in message
    for name in universal_resume.MODEL_STATES:
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="ds_to_universal wrote no"):
        universal_resume._unify(folder)


class ZeroOptimizer:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_repair_gives_each_state_its_own_step_and_each_group_its_hyperparameters():
    """What DeepSpeed 0.19.8's ZeRO-3 universal load leaves: one step tensor shared by every sub-group's state, and
    every param group with group 0's hyperparameters."""
    module = tiny_causal_lm()
    adamw = torch.optim.AdamW(_optimizer_groups(module, weight_decay=0.1), lr=1e-2)
    built = [dict(group) for group in adamw.param_groups]
    shared = torch.tensor(5.0)
    for group in adamw.param_groups:
        group["weight_decay"] = 0.1
        for p in group["params"]:
            adamw.state[p] = {"step": shared, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    universal_resume.repair_optimizer_state(ZeroOptimizer(adamw), built)
    steps = [state["step"] for state in adamw.state.values()]
    assert all(float(s) == 5.0 and s.device.type == "cpu" for s in steps)
    assert len({id(s) for s in steps}) == len(steps) and all(s is not shared for s in steps)
    assert [group["weight_decay"] for group in adamw.param_groups] == [0.1, 0.0]


def state(world_size: int, zero_stage: int) -> TrainerState:
    return TrainerState(step=2, sampler={}, world_size=world_size, pairs_per_step=8, data_fingerprint="d",
                        model_fingerprint="m", config={}, zero_stage=zero_stage)


@pytest.mark.parametrize("saved, resumed, universal, by_deepspeed", [
    ((2, 3), (2, 3), False, False), ((2, 3), (1, 3), True, True), ((2, 3), (2, 0), True, False),
    ((2, 0), (2, 3), True, True), ((2, 0), (4, 0), False, False), ((2, 2), (2, 1), True, True),
    ((2, 1), (1, 1), True, True), ((1, 2), (1, 2), False, False), ((1, 1), (4, 0), True, False)])
def test_which_resumes_go_through_the_universal_layout(saved, resumed, universal, by_deepspeed):
    """A changed stage always; a changed world size unless stage 0, where every rank holds the whole state.
    DeepSpeed loads the layout into stages 1-3; dpo-ds into stage 0."""
    assert state(*saved).needs_universal(*resumed) is universal
    assert state(*saved).deepspeed_loads_universal(*resumed) is by_deepspeed


def test_a_failed_ds_to_universal_is_one_line_with_its_last_line(tmp_path: Path, monkeypatch, caplog):
    def failed(cmd, **_):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n")

    monkeypatch.setattr(universal_resume.subprocess, "run", failed)
    with pytest.raises(CheckpointError) as refused:
        universal_resume._ds_to_universal(tmp_path / "ds", tmp_path / "ds_universal.tmp")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "ds"))
    assert "exit status 1: KeyError: 'x'" in message
    assert "Traceback (most recent call last)" in caplog.text  # the whole output goes to the log
