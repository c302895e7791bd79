"""Resuming at another world size: what DeepSpeed's ZeRO-3 universal-checkpoint load leaves wrong, and its repair
(checkpoint.load_checkpoint calls it after every universal load)."""
from __future__ import annotations

from typing import Any

import torch


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
