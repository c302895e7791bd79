"""How the policy engine is sized to the job: its ZeRO stage (`zero_stage`) and whether it recomputes activations
(`gradient_checkpointing`), as set or, under `auto`, from `dpo-ds plan`'s memory model against what one rank may
fill (its GPU's memory; on CPU its share of the host's). Below stage 3 every rank holds the whole model, so ZeRO-3's
per-module gathers, its linear wrapper and the flatten/reduce-scatter of every gradient buy nothing; where the
activations of a whole step fit too, neither does the recompute (a third forward pass)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_ds import packed_attention
from dpo_ds.config import TrainConfig, uses_lora, uses_reference
from dpo_ds.engines.accelerator import on_cpu
from dpo_ds.families import load_model_config
from dpo_ds.plan.memory import GIB, HEADROOM, Setup, replicated_bytes
from dpo_ds.plan.shapes import shape_from_config
from launcher import dist as comm


@dataclass(frozen=True)
class StageChoice:
    stage: int
    reason: str


@dataclass(frozen=True)
class CheckpointingChoice:
    on: bool
    reason: str


def rank_memory_bytes() -> tuple[float, str]:
    """What one rank may fill, and what it is: its GPU's memory, or on CPU its share of the host's."""
    if on_cpu():
        ranks = comm.local_world_size()
        share = f", shared by {ranks} ranks" if ranks > 1 else ""
        return host_memory_bytes() / ranks, f"this host's memory{share}"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return float(props.total_memory), f"the {props.name}'s memory"


def host_memory_bytes() -> float:
    """The host's physical memory, or the memory limit of this process's cgroup (a Slurm job's --mem, a container's)
    where it is lower, at any level of the cgroup's path."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in _cgroup_limit_files():
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (cgroup v2) means no limit
            total = min(total, int(text))
    return float(total)


def _cgroup_limit_files() -> list[Path]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: memory.max in the group and each ancestor
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = Path(path.lstrip("/")).parts
        files += [root.joinpath(*parts[:depth], name) for depth in range(len(parts), -1, -1)]
    return files


def zero_stage_choice(cfg: TrainConfig, data_parallel_size: int) -> StageChoice:
    if cfg.zero_stage != "auto":
        return StageChoice(int(cfg.zero_stage), "set by zero_stage")
    if uses_lora(cfg):
        return StageChoice(3, "LoRA/QLoRA runs use ZeRO-3 (zero_stage auto)")
    if cfg.sequence_parallel_size > 1:
        return StageChoice(3, "sequence parallelism runs on ZeRO-3 (zero_stage auto)")
    checkpointing = str(cfg.gradient_checkpointing).lower() != "false"  # auto decides after the stage, by memory too
    for stage in (0, 1, 2):
        need, budget, memory = _step_bytes(cfg, data_parallel_size, stage, checkpointing)
        if need <= budget:
            return StageChoice(stage, f"zero_stage auto: the whole model fits one rank at stage {stage} "
                                      f"({_fill(need, budget, memory)})")
    return StageChoice(3, f"zero_stage auto: stage 2 needs {need / GIB:.2f} GiB per rank, more than "
                          f"{_budget(budget, memory)}: ZeRO-3 partitions the model")


# Attention kernels that keep no [T, T] scores for backward: plan's per-layer activations hold for them
# (measured within 8% for sdpa); eager attention keeps the softmax, which plan does not count.
MEMORY_LIGHT_ATTENTION = ("sdpa", packed_attention.KERNEL, "flash_attention_2", "flash_attention_3")


def checkpointing_choice(cfg: TrainConfig, stage: int, data_parallel_size: int,
                         attention: str | None) -> CheckpointingChoice:
    """Whether the policy recomputes each layer's activations in the backward pass instead of keeping them
    (`attention`: the loaded model's attention kernel)."""
    setting = str(cfg.gradient_checkpointing).lower()
    if setting != "auto":
        return CheckpointingChoice(setting == "true", "set by gradient_checkpointing")
    if stage == 3:
        return CheckpointingChoice(True, "gradient_checkpointing auto: on at ZeRO stage 3 (the model is partitioned)")
    if attention not in MEMORY_LIGHT_ATTENTION:
        return CheckpointingChoice(True, f"gradient_checkpointing auto: on with {attention} attention, whose saved "
                                         f"scores dpo-ds plan's memory model does not count")
    if _shape(cfg.model_name_or_path, cfg.trust_remote_code).num_experts > 1:
        return CheckpointingChoice(True, "gradient_checkpointing auto: on for a mixture of experts, whose routed "
                                         "copies dpo-ds plan's memory model counts only in part")
    need, budget, memory = _step_bytes(cfg, data_parallel_size, stage, checkpointing=False)
    if need <= budget:
        return CheckpointingChoice(False, f"gradient_checkpointing auto: a step's activations fit without the "
                                          f"recompute ({_fill(need, budget, memory)})")
    return CheckpointingChoice(True, f"gradient_checkpointing auto: without the recompute a step needs "
                                     f"{need / GIB:.2f} GiB per rank, more than {_budget(budget, memory)}")


def _fill(need: float, budget: float, memory: str) -> str:
    return f"{need / GIB:.2f} GiB of {_budget(budget, memory)}"


def _budget(budget: float, memory: str) -> str:
    return f"{budget / GIB:.2f} GiB, {1 - HEADROOM:.0%} of {memory}"


def _step_bytes(cfg: TrainConfig, data_parallel_size: int, stage: int, checkpointing: bool) -> tuple[float, float, str]:
    """Bytes one rank needs at ZeRO stage 0-2 (plan's memory model), what it may fill, and what that memory is."""
    total, memory = rank_memory_bytes()
    # A token budget lets a micro-batch carry more pairs than micro_batch_size: count the most it can hold.
    pairs = (max(1, -(-cfg.max_tokens_per_micro_batch // (2 * cfg.max_length))) if cfg.max_tokens_per_micro_batch
             else cfg.micro_batch_size)
    need = _replicated_bytes(cfg.model_name_or_path, cfg.trust_remote_code, cfg.precision, cfg.max_length, pairs,
                             uses_reference(cfg) and not cfg.precompute_ref, cfg.fused_lm_head, data_parallel_size,
                             total, stage, checkpointing)
    return need, (1 - HEADROOM) * total, memory


@functools.lru_cache(maxsize=8)
def _shape(model: str, trust_remote_code: bool):
    return shape_from_config(load_model_config(model, trust_remote_code), model)


@functools.lru_cache(maxsize=32)
def _replicated_bytes(model: str, trust_remote_code: bool, precision: str, max_length: int, micro_batch_size: int,
                      live_reference: bool, fused_lm_head: bool, data_parallel_size: int, memory_bytes: float,
                      stage: int, checkpointing: bool) -> float:
    shape = _shape(model, trust_remote_code)
    setup = Setup(nodes=1, gpus_per_node=data_parallel_size, gpu_memory_gb=memory_bytes / GIB, cpu_memory_gb=0,
                  seq_len=max_length, micro_batch_size=micro_batch_size, precision=precision,
                  reference="gpu" if live_reference else "none", fused_lm_head=fused_lm_head,
                  gradient_checkpointing=checkpointing)
    return replicated_bytes(shape, setup, stage)


def stage_reason(cfg: TrainConfig, ds_config: dict) -> str:
    """Why the policy's engine runs the stage `ds_config` says (for the log)."""
    stage = ds_config["zero_optimization"]["stage"]
    choice = zero_stage_choice(cfg, data_parallel_ranks(ds_config))
    return choice.reason if choice.stage == stage else f"set by {cfg.deepspeed_config} (zero_optimization.stage)"


def data_parallel_ranks(ds_config: dict) -> int:
    return ds_config["train_batch_size"] // (ds_config["train_micro_batch_size_per_gpu"]
                                             * ds_config["gradient_accumulation_steps"])
