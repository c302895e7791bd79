"""Resuming a checkpoint at another world size or another ZeRO stage, through DeepSpeed's universal checkpoint
layout: `step-N/ds_universal/`, written once by rank 0 (`prepare`), then read by every rank's engine
(checkpoint.load_checkpoint):

    zero/<parameter>/fp32.pt, exp_avg.pt, exp_avg_sq.pt   {"param": the whole tensor}: weight and Adam's moments
    zero/<parameter>/step.pt                              Adam's step count
    zero/optimizer_state.pt                               optimizer-wide state: the param groups' hyperparameters
    mp_rank_00_model_states.pt                            engine state (lr schedule, step counters; no weights),
    zero_pp_rank_0_mp_rank_00_model_states.pt             the same under the name a ZeRO-3 engine looks for
    dpo_ds_layout.json                                    written last, once the rest is on disk: the layout is complete

DeepSpeed 0.19.8's `deepspeed.checkpoint.ds_to_universal` writes it from a ZeRO stage 1-3 checkpoint in two dialects
(from stage 3: bare flat tensors, no step.pt, the torch optimizer's state dict in optimizer_state.pt; from stages
1-2: the "param" dicts and step.pt, no torch state dict), and its engines (`checkpoint.load_universal`) read one
dialect each: stages 1-2 the second, stage 3 the first. Neither side knows stage 0, whose only file,
mp_rank_00_model_states.pt, holds the whole module and the optimizer's state. So:
- from stage 0, `_whole_to_universal` writes the layout; from stages 1-3, ds_to_universal does and `_unify`
  completes it into what every loader reads;
- an engine of stage 1-3 loads it with DeepSpeed (the run's DeepSpeed config sets checkpoint.load_universal) and
  `repair_optimizer_state` undoes what that load leaves wrong; a stage-0 engine loads it with `load_into_whole_engine`.
Any stage resumes any other's checkpoint, at any world size, in fp32 and bf16 alike.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

from dpo_ds.durable import fsync_dir, fsync_tree, write_text_atomic
from dpo_ds.errors import CheckpointError

logger = logging.getLogger("dpo_ds")

COMPLETE = "dpo_ds_layout.json"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
TENSORS = ("fp32", "exp_avg", "exp_avg_sq")
# client_state of a stage-0 checkpoint: each optimizer group's parameter names, in the group's order (the torch
# optimizer's state is keyed by position; stages 1-3 name their parameters in DeepSpeed's own metadata)
PARAM_NAMES = "dpo_ds_param_names"


def checkpoint_client_state(engine) -> dict[str, Any]:
    """What the policy engine's checkpoint records besides DeepSpeed's own state (engine.save_checkpoint's
    client_state): at stage 0 the parameter names `_whole_to_universal` needs, otherwise nothing."""
    if engine.zero_optimization_stage() != 0:
        return {}
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return {PARAM_NAMES: [[names[id(p)] for p in params] for params in _group_params(engine.optimizer)]}


def _group_params(optimizer) -> list[list[torch.nn.Parameter]]:
    """A stage-0 engine's trained parameters per optimizer group, in order: the torch optimizer's own (fp32), or
    those of DeepSpeed's bf16 wrapper, whose torch optimizer steps fp32 master copies (`_is_wrapper`)."""
    if _is_wrapper(optimizer):
        return optimizer.fp16_groups
    return [group["params"] for group in optimizer.param_groups]


def _is_wrapper(optimizer) -> bool:
    """DeepSpeed's bf16 wrapper of a stage-0 engine: FP16_Optimizer (a fused optimizer: one flat master copy per
    group, `fp32_groups_flat`) or FP16_UnfusedOptimizer (torch's AdamW: one master copy per parameter, `fp32_groups`)."""
    return hasattr(optimizer, "fp16_groups")


def prepare(source: Path, target: Path, source_stage: int, parallel) -> None:
    """Write the universal layout of the DeepSpeed checkpoint `source` (saved by a ZeRO stage `source_stage` engine)
    to `target`, on rank 0, unless it is there already (every rank calls this). A layout left by an earlier dpo-ds
    (without COMPLETE) is written again."""

    def convert() -> None:
        if (target / COMPLETE).is_file():
            return
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converting %s (ZeRO stage %d) to a universal checkpoint", source, source_stage)
        try:
            if source_stage == 0:
                _whole_to_universal(source, tmp)
            else:
                _ds_to_universal(source, tmp)
                _unify(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_tree(tmp)  # every file on disk before the mark says the layout is complete
        write_text_atomic(tmp / COMPLETE, json.dumps({"source_zero_stage": source_stage}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)

    parallel.on_rank0(f"converting {source} to a universal checkpoint", convert, CheckpointError)


def _ds_to_universal(source: Path, output: Path) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(output), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # stages 1-2: our checkpoints carry no universal_checkpoint_info (no AutoTP)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # the whole output to the log, its last line in the one-line error
        logger.error("ds_to_universal on %s failed (exit %d):\n%s", source, proc.returncode, proc.stderr[-3000:])
        last = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output")
        raise CheckpointError(f"{source}: universal conversion (deepspeed.checkpoint.ds_to_universal) failed with "
                              f"exit status {proc.returncode}: {last} (its output is in the log above)")
    (output.parent / "latest_universal").unlink(missing_ok=True)  # its pointer to `output`: we load by path


def _save(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)


def _replace(value, path: Path) -> None:
    """Save over `path` through a new file: the old one may still be memory-mapped by the caller."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


def _engine_state(model_states: dict[str, Any]) -> dict[str, Any]:
    """A model-states file's engine state without its weights (the universal layout holds them under zero/)."""
    return {**model_states, "module": {}, "optimizer": None}


def _unify(folder: Path) -> None:
    """Complete ds_to_universal's output (either dialect) into the layout of the module docstring, in place."""
    zero = folder / "zero"
    meta_file = next((folder / name for name in MODEL_STATES if (folder / name).is_file()), None)
    if meta_file is None:
        raise CheckpointError(f"{folder}: ds_to_universal wrote no {' or '.join(MODEL_STATES)}")
    meta = torch.load(meta_file, map_location="cpu", mmap=True, weights_only=False)
    shared = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    torch_state = shared.get(OPTIMIZER_STATE_DICT)  # from stage 3 only: state index = ZeRO-3 sub-group
    step = None
    for sub_group, shapes in enumerate(meta["param_shapes"]):
        for name, shape in shapes.items():
            missing = [key for key in TENSORS if not (zero / name / f"{key}.pt").is_file()]
            if missing:  # another optimizer's state (SGD, Lion, ...): the layout carries Adam's only
                raise CheckpointError(f"{folder.parent}: the universal checkpoint holds Adam's state only (step, "
                                      f"exp_avg, exp_avg_sq); this optimizer's state has no {', '.join(missing)} "
                                      f"for {name}: resume it at the ZeRO stage that wrote it")
            for key in TENSORS:
                value = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
                if torch.is_tensor(value):  # stage-3 dialect: flat
                    _replace({PARAM: value.view(shape)}, zero / name / f"{key}.pt")
            if not (zero / name / "step.pt").is_file():
                _save(torch_state["state"][sub_group]["step"], zero / name / "step.pt")
            step = torch.load(zero / name / "step.pt", weights_only=False)
    if torch_state is None:  # stages 1-2: the step and groups where a ZeRO-3 engine reads them
        shared[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": shared[PARAM_GROUPS]}
    shared.setdefault(DS_VERSION, meta[DS_VERSION])  # stage 3 does not record it; a stage 1-2 engine requires it
    _replace(shared, zero / "optimizer_state.pt")
    for name in MODEL_STATES:
        _replace(_engine_state(meta), folder / name)


def _whole_to_universal(source: Path, output: Path) -> None:
    """The universal layout of a stage-0 checkpoint: the whole module and its optimizer's state, which is torch
    AdamW's state dict in fp32 (per parameter, keyed by position in the groups) and, in bf16, DeepSpeed's wrapper's
    (`_is_wrapper`: the fp32 master copies, and the state dict of the torch optimizer that steps them). A parameter
    that never had a gradient has no Adam state: it is written with zero moments, as ZeRO's flat state holds it."""
    path = source / MODEL_STATES[0]
    meta = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    names = meta.get(PARAM_NAMES)
    if names is None:
        raise CheckpointError(f"{path}: this ZeRO stage 0 checkpoint does not record its optimizer's parameter names "
                              f"(written before dpo-ds could convert stage 0): resume it at ZeRO stage 0")
    module, optimizer = meta["module"], meta["optimizer"]
    torch_state = optimizer.get(OPTIMIZER_STATE_DICT, optimizer)  # a bf16 wrapper's, or torch's own state dict
    other = {key for state in torch_state["state"].values() for key in state} - {"step", *TENSORS[1:]}
    if other:
        raise CheckpointError(f"{path}: the universal checkpoint holds Adam's state only (step, exp_avg, exp_avg_sq), "
                              f"this optimizer's has {', '.join(sorted(other))}: resume it at ZeRO stage 0")
    steps = []
    for group, group_names in enumerate(names):
        if "fp32_groups_flat" in optimizer:
            states = _split_flat(optimizer["fp32_groups_flat"][group], torch_state["state"].get(group, {}),
                                 [module[name].shape for name in group_names])
        else:
            masters = optimizer["fp32_groups"][group] if "fp32_groups" in optimizer else [module[n] for n in group_names]
            states = [{"fp32": master, **torch_state["state"].get(index, {})}
                      for master, index in zip(masters, torch_state["param_groups"][group]["params"], strict=True)]
        for name, state in zip(group_names, states):
            if "step" in state:
                steps.append(float(state["step"]))
            fp32 = state["fp32"].float()
            for key in TENSORS:
                value = fp32 if key == "fp32" else state.get(key, torch.zeros_like(fp32))
                _save({PARAM: value.float().clone()}, output / "zero" / name / f"{key}.pt")  # clone: not the storage
    step = torch.tensor(max(steps, default=0.0))  # the optimizer's steps (a parameter without gradient skipped some)
    for name in (name for group_names in names for name in group_names):
        _save(step.clone(), output / "zero" / name / "step.pt")
    groups = [{key: value for key, value in group.items() if key != "params"} for group in torch_state["param_groups"]]
    _save({PARAM_GROUPS: groups, OPTIMIZER_STATE_DICT: {"state": {0: {"step": step}}, "param_groups": groups},
           DS_VERSION: meta[DS_VERSION]}, output / "zero" / "optimizer_state.pt")
    for name in MODEL_STATES:
        _save(_engine_state(meta), output / name)


def _split_flat(fp32_flat: torch.Tensor, flat_state: dict[str, Any], shapes: list[torch.Size]) -> list[dict]:
    """One group of DeepSpeed's bf16 wrapper: its flat master copy and Adam state, cut into its parameters."""
    states, offset = [], 0
    for shape in shapes:
        numel = shape.numel()
        state = {key: value.narrow(0, offset, numel).view(shape) for key, value in
                 [("fp32", fp32_flat), *((key, flat_state[key]) for key in TENSORS[1:] if key in flat_state)]}
        if "step" in flat_state:
            state["step"] = flat_state["step"]
        states.append(state)
        offset += numel
    return states


def _read(folder: Path, key: str) -> torch.Tensor:
    value = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)
    if key == "step":
        return torch.as_tensor(value, dtype=torch.float32)
    return value[PARAM]


def load_into_whole_engine(engine, folder: Path) -> None:
    """Restore a stage-0 engine from the universal layout `folder`, as DeepSpeed restores one from its own stage-0
    checkpoint: weights, the optimizer's state and param-group hyperparameters, the lr schedule, the step counters."""
    zero = folder / "zero"
    shared = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    meta = torch.load(folder / MODEL_STATES[0], map_location="cpu", weights_only=False)
    names = {id(p): name for name, p in engine.module.named_parameters()}
    optimizer = engine.optimizer
    state = {}  # the torch optimizer's, keyed by position as in its state_dict
    for group, params in enumerate(_group_params(optimizer)):
        saved = [{key: _read(zero / names[id(p)], key) for key in (*TENSORS, "step")} for p in params]
        if hasattr(optimizer, "fp32_groups_flat"):
            if params:
                flat = {key: torch.cat([tensors[key].flatten() for tensors in saved]) for key in TENSORS}
                optimizer.fp32_groups_flat[group].data.copy_(flat["fp32"])
                optimizer.fp16_groups_flat[group].data.copy_(flat["fp32"])  # the bf16 parameters are views of it
                state[group] = {"step": saved[0]["step"], "exp_avg": flat["exp_avg"], "exp_avg_sq": flat["exp_avg_sq"]}
            continue
        masters = optimizer.fp32_groups[group] if _is_wrapper(optimizer) else params
        for p, master, tensors in zip(params, masters, saved, strict=True):
            with torch.no_grad():
                master.copy_(tensors["fp32"].view_as(master))
                p.copy_(master)  # the bf16 copy (a no-op in fp32, where the master is the parameter)
            state[len(state)] = {key: tensors[key] for key in ("step", "exp_avg", "exp_avg_sq")}
    torch_optimizer = optimizer.optimizer if _is_wrapper(optimizer) else optimizer
    current = torch_optimizer.state_dict()["param_groups"]
    for group, saved_group in zip(current, shared[PARAM_GROUPS], strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    torch_optimizer.load_state_dict({"state": state, "param_groups": current})  # casts to each parameter's device
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps, engine.skipped_steps = meta["global_steps"], meta["skipped_steps"]
    engine.global_samples = meta.get("global_samples", engine.global_steps * engine.train_batch_size())


def repair_optimizer_state(zero_optimizer, groups_as_built: list[dict[str, Any]]) -> None:
    """Undo what DeepSpeed's universal-checkpoint load (stages 1-3, checked in deepspeed 0.19.8) leaves wrong, which
    makes a resumed run drift from the run it continues (issue 15):

    - ZeRO-3 gives every sub-group's Adam state the same `step` tensor object. torch's AdamW (fused or foreach)
      increments `step` in place and DeepSpeed steps one sub-group at a time, so with two sub-groups (our decay
      and no-decay groups) the shared count advances twice per optimizer step and the bias correction of every
      update after the resume is wrong. Every state gets its own step tensor, where torch's AdamW keeps it (on the
      parameter's device when fused or capturable, else on the CPU), or an int for DeepSpeed's CPU Adam: a
      checkpoint of another stage may count in the other type;
    - ZeRO-3 gives every param group param group 0's hyperparameters, so the no-decay group (norms, biases) is
      decayed with weight_decay > 0. The hyperparameters that differ between our groups are set back to the
      values this run built them with (the resume check has verified that the fields they come from did not
      change).

    Both repairs are no-ops on a state that is already right."""
    torch_optimizer = zero_optimizer.optimizer
    on_device = bool(torch_optimizer.defaults.get("fused") or torch_optimizer.defaults.get("capturable"))
    for param, state in torch_optimizer.state.items():
        if "step" not in state:
            continue
        if isinstance(torch_optimizer, (DeepSpeedCPUAdam, FusedAdam)):  # their kernels take the step as an int
            state["step"] = int(state["step"])
        else:
            step = torch.as_tensor(state["step"], dtype=torch.float32)
            state["step"] = step.to(param.device if on_device else "cpu", copy=True)
    per_group = {key for key in groups_as_built[0] if key != "params"
                 and any(group.get(key) != groups_as_built[0][key] for group in groups_as_built)}
    for group, built in zip(torch_optimizer.param_groups, groups_as_built):
        for key in per_group:
            group[key] = built[key]
