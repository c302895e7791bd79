"""The policy's ZeRO stage (the `zero_stage` field): as set, or under `auto` the lowest stage whose per-rank memory
fits the GPU, by `dpo-ds plan`'s memory model (on CPU: 3). Below stage 3 every rank holds the whole model, so ZeRO-3's
per-module gathers, its linear wrapper and the flatten/reduce-scatter of every gradient buy nothing."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dpo_ds.config import TrainConfig, uses_lora, uses_reference
from dpo_ds.engines.accelerator import on_cpu


@dataclass(frozen=True)
class StageChoice:
    stage: int
    reason: str


def device_memory_bytes() -> tuple[float, str]:
    """What one rank may fill, and what it is: its GPU's memory."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return float(props.total_memory), f"the {props.name}'s memory"


def zero_stage_choice(cfg: TrainConfig, data_parallel_size: int) -> StageChoice:
    if cfg.zero_stage != "auto":
        return StageChoice(int(cfg.zero_stage), "set by zero_stage")
    if uses_lora(cfg):
        return StageChoice(3, "LoRA/QLoRA runs use ZeRO-3 (zero_stage auto)")
    if cfg.sequence_parallel_size > 1:
        return StageChoice(3, "sequence parallelism runs on ZeRO-3 (zero_stage auto)")
    if on_cpu():
        # BENCHMARKS.md §14: one idle process runs the small shape 1.3-1.7x faster at stage 0, but under contention
        # (ranks sharing cores) OpenMP's spinning workers made it several times slower; OMP_WAIT_POLICY=PASSIVE
        # removes that, at a cost on an idle machine not yet measured, so auto keeps 3 on CPU.
        return StageChoice(3, "zero_stage auto on CPU: ZeRO-3 (stage 0 is faster on an idle CPU but degrades "
                              "under contention: BENCHMARKS.md; set zero_stage to choose)")
    return _fitting_stage(cfg.model_name_or_path, cfg.trust_remote_code, cfg.precision, cfg.max_length, cfg.micro_batch_size,
                          uses_reference(cfg) and not cfg.precompute_ref, cfg.fused_lm_head, data_parallel_size)


@functools.lru_cache(maxsize=8)
def _fitting_stage(model: str, trust_remote_code: bool, precision: str, max_length: int, micro_batch_size: int, live_reference: bool,
                   fused_lm_head: bool, data_parallel_size: int) -> StageChoice:
    from dpo_ds.families import load_model_config
    from dpo_ds.plan.memory import GIB, HEADROOM, Setup, replicated_bytes
    from dpo_ds.plan.shapes import shape_from_config

    shape = shape_from_config(load_model_config(model, trust_remote_code), model)
    total, device = device_memory_bytes()
    budget = (1 - HEADROOM) * total
    setup = Setup(nodes=1, gpus_per_node=data_parallel_size, gpu_memory_gb=total / GIB, cpu_memory_gb=0,
                  seq_len=max_length, micro_batch_size=micro_batch_size, precision=precision,
                  reference="gpu" if live_reference else "none", fused_lm_head=fused_lm_head)
    for stage in (0, 1, 2):
        need = replicated_bytes(shape, setup, stage)
        if need <= budget:
            return StageChoice(stage, f"zero_stage auto: the whole model fits one rank at stage {stage} "
                                      f"({need / GIB:.2f} GiB of {budget / GIB:.2f} GiB, {1 - HEADROOM:.0%} of {device})")
    return StageChoice(3, f"zero_stage auto: stage 2 needs {need / GIB:.2f} GiB per rank, more than "
                          f"{budget / GIB:.2f} GiB ({1 - HEADROOM:.0%} of {device}): ZeRO-3 partitions the model")


def stage_reason(cfg: TrainConfig, ds_config: dict) -> str:
    """Why the policy's engine runs the stage `ds_config` says (for the log)."""
    stage = ds_config["zero_optimization"]["stage"]
    ranks = ds_config["train_batch_size"] // (ds_config["train_micro_batch_size_per_gpu"]
                                              * ds_config["gradient_accumulation_steps"])
    choice = zero_stage_choice(cfg, ranks)
    return choice.reason if choice.stage == stage else f"set by {cfg.deepspeed_config} (zero_optimization.stage)"
