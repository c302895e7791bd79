"""The engines' lifecycle: the policy engine (trained: optimizer groups, learning-rate schedule,
gradient checkpointing, LoRA adapters) and frozen inference engines, built in the same order on every rank (ZeRO-3
hangs when ranks build or run modules in different orders or counts), and released when no longer needed."""
from __future__ import annotations

import functools
import gc
import logging
import math
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.utils import clip_grad_norm_

from dpo_ds.compat import enable_activation_checkpointing
from dpo_ds.config import TrainConfig, uses_lora
from dpo_ds.engines.accelerator import count_cpu_devices_once
from dpo_ds.engines.sizing import checkpointing_choice, data_parallel_ranks, stage_reason
from dpo_ds.engines.models import attention_kernel, load_sharded_model, mark_expert_blocks, model_dtype, prepare_model
from dpo_ds.hf_dir import ConfigOverride
from dpo_ds.lora import Adapters, attach_adapters, load_quantized_base

logger = logging.getLogger(__name__)


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; norms and biases (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 parameters are flat partitions; ds_shape is the real one
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate at optimizer step `step` over the peak rate: transformers' schedule of the same shape
    (get_scheduler's constant_with_warmup, linear, and cosine of half a cycle), its formulas as written there, so
    the rates are the ones a transformers/TRL run of the same settings uses. Not imported from it: importing
    transformers.optimization imports peft and bitsandbytes (transformers.trainer_utils), 55 MiB more resident
    memory in every rank of a run without LoRA (BENCHMARKS.md section 13)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # cosine, num_cycles 0.5


SCHEDULES = ("constant", "linear", "cosine")  # the lr_scheduler field's values


def lr_scheduler(schedule: str, warmup_steps: int, total_steps: int):
    """The schedule as DeepSpeed takes it (a function of the optimizer): a LambdaLR of `schedule_factor`, as
    transformers builds its own (a partial, so its state dict is the same)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    factor = functools.partial(schedule_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class PolicyEngine:
    """The policy's engine and what the run did to its model, declared here rather than stored on the model."""
    engine: deepspeed.DeepSpeedEngine
    config_overrides: list[ConfigOverride]  # undone in the config files the run writes (hf_dir.saved_config)
    adapters: Adapters | None               # LoRA: the peft handle; None for full fine-tuning
    gradient_checkpointing: bool            # whether the backward recomputes each layer's activations


def build_policy_engine(cfg: TrainConfig, ds_config: dict[str, Any], total_steps: int, mpu=None) -> PolicyEngine:
    """`mpu`: sequence_parallel.setup's groups under sequence parallelism (DeepSpeed then counts data-parallel
    ranks as world / S), else None."""
    count_cpu_devices_once()
    if cfg.lora_quantize is not None:  # QLoRA: the frozen base in 4 bits, partitioned by deepspeed.initialize
        model = load_quantized_base(cfg, model_dtype(cfg), attention_kernel(cfg))
    else:
        model = load_sharded_model(cfg.model_name_or_path, ds_config, model_dtype(cfg), cfg.trust_remote_code,
                                   cfg.weights_loader, attention_kernel(cfg))
    overrides = prepare_model(model, cfg)
    model.train()
    stage = ds_config["zero_optimization"]["stage"]
    checkpointing = checkpointing_choice(cfg, stage, data_parallel_ranks(ds_config), model.config._attn_implementation)
    logger.info("policy engine: ZeRO stage %d (%s); gradient checkpointing %s (%s)", stage,
                stage_reason(cfg, ds_config), "on" if checkpointing.on else "off", checkpointing.reason)
    if checkpointing.on:
        enable_activation_checkpointing(model)
    # LoRA: base frozen, only adapter parameters reach the optimizer
    adapters = attach_adapters(model, cfg, checkpointing.on) if uses_lora(cfg) else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_optimizer_groups(model, cfg.weight_decay), config=ds_config,
        lr_scheduler=lr_scheduler(cfg.lr_scheduler, cfg.warmup_steps, total_steps), mpu=mpu)
    # NaN/Inf gradients on any rank make the all-reduced gradient norm non-finite; DeepSpeed (>= 0.19.8) then
    # skips the update on every rank and `was_step_applied()` is False: ZeRO's optimizers and the bf16 wrapper do,
    # a stage-0 fp32 engine once guarded.
    if stage == 0 and engine.optimizer is engine.basic_optimizer:  # fp32: no DeepSpeed wrapper around it
        guard_plain_optimizer_step(engine)
    return PolicyEngine(engine, overrides, adapters, checkpointing.on)


def guard_plain_optimizer_step(engine: deepspeed.DeepSpeedEngine) -> None:
    """At ZeRO stage 0 in fp32 DeepSpeed steps the torch optimizer itself: it clips the gradients
    (`clip_fp32_gradients`) but neither keeps their norm (the `grad_norm` metric) nor skips a step whose norm is
    NaN/Inf, as ZeRO's optimizers and the bf16 wrapper do. Here the clip keeps the norm it computes (DeepSpeed's
    own `clip_grad_norm_`; without clipping the step computes it) as the optimizer's `_global_grad_norm`, and a
    non-finite norm sets its `overflow`, on which DeepSpeed skips the update and the LR step. The gradients are
    all-reduced before, so every rank decides alike."""
    optimizer, params = engine.optimizer, list(engine.module.parameters())

    def keep_norm(norm) -> None:
        optimizer._global_grad_norm = float(norm)
        optimizer.overflow = not math.isfinite(optimizer._global_grad_norm)

    def clip() -> None:
        keep_norm(clip_grad_norm_(parameters=params, max_norm=engine.gradient_clipping(), mpu=engine.mpu))

    step = optimizer.step

    @functools.wraps(step)  # keeps the LR scheduler's mark on the step it wrapped (else torch warns it was replaced)
    def guarded_step(*args, **kwargs):
        if engine.gradient_clipping() <= 0:  # DeepSpeed did not clip: nothing measured the gradients yet
            keep_norm(clip_grad_norm_(parameters=params, max_norm=math.inf, mpu=engine.mpu))
        if not optimizer.overflow:
            step(*args, **kwargs)

    engine.clip_fp32_gradients = clip
    optimizer.step = guarded_step


def build_inference_engine(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                           weights_loader: str = "streamed", attn_implementation: str | None = None,
                           cfg: TrainConfig | None = None, mpu=None):
    """A frozen engine without optimizer (ZeRO-3, or stage 0 beside a policy below stage 3), in eval mode
    (prepared as `cfg` says when given; `mpu` as build_policy_engine's)."""
    count_cpu_devices_once()
    model = load_sharded_model(path, ds_config, dtype, trust_remote_code, weights_loader, attn_implementation)
    if cfg is not None:
        prepare_model(model, cfg)
    else:
        mark_expert_blocks(model)
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu)
    engine.eval()
    return engine


def release_engine(engine) -> None:
    """Free an engine that is no longer needed (the reference after precomputing its log-probs)."""
    from deepspeed.runtime.zero import parameter_offload

    engine.destroy()
    # DeepSpeed 0.19 appends every ZeRO-3 model's root module to this module-level stack and never removes it,
    # which keeps the model, its hooks and so the whole engine alive.
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not engine.module]
    # Something else in DeepSpeed can still hold the engine object; its weights must go regardless.
    for param in engine.module.parameters():
        if hasattr(param, "ds_tensor"):
            param.ds_tensor.data = torch.empty(0, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    del engine
    gc.collect()
    get_accelerator().empty_cache()
    release_host_cache()


def release_host_cache() -> None:
    """Give torch's cached pinned host memory back to the system (empty_cache frees only device memory): after
    the reference's precompute, its offloaded (pinned) weights would otherwise stay allocated all run."""
    if torch.cuda.is_available():
        empty = getattr(torch.accelerator, "empty_host_cache", None) or torch._C._host_emptyCache
        empty()

