"""DeepSpeed engines: the ZeRO-3 policy (trained) and the reference source (frozen).

Both models are built sharded (partitioned by `zero.Init` as they are constructed, weights streamed into
the partitions: see `load_sharded_model`) and always in the same order on every rank. ZeRO-3 hangs when
ranks build or run modules in different orders or counts.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import gc
import inspect
import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from dpo_ds.config import ConfigError, TrainConfig, uses_lora
from dpo_ds.hf_dir import ConfigOverride
from dpo_ds.loading import has_safetensors, load_sharded_pretrained
from dpo_ds.logprobs import head_sequence_logps, scored_positions, sequence_logps
from dpo_ds.lora import Adapters, attach_adapters, load_quantized_base

logger = logging.getLogger("dpo_ds")

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def default_config_path(kind: str) -> Path:
    name = {"policy": "zero3_cpu.json" if on_cpu() else "zero3.json", "reference": "reference_zero3.json"}[kind]
    path = DS_CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"default DeepSpeed preset {path} not found; pass deepspeed_config / ref_deepspeed_config")
    return path


def _load_json(path: str | Path, field_name: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"field '{field_name}': {path} not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (field '{field_name}')") from None


def _fill(section: dict, key: str, value: Any) -> None:
    """Set `key` when it is missing or "auto"; an explicit value in the JSON wins."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def _check_no_auto(node: Any, path: str, source: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_auto(v, f"{path}.{k}" if path else k, source)
    elif node == "auto":
        raise ConfigError(f"{source}: '{path}' is \"auto\" but dpo-ds has no value for it; set it explicitly")


def resolve_policy_config(cfg: TrainConfig, world_size: int, hidden_size: int) -> dict[str, Any]:
    """The policy's DeepSpeed config with every "auto" (or missing) value filled from the run config."""
    source = cfg.deepspeed_config or default_config_path("policy")
    ds = copy.deepcopy(_load_json(source, "deepspeed_config"))
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps)
    _fill(ds, "train_batch_size", cfg.global_batch_pairs(world_size))
    _fill(ds, "gradient_clipping", cfg.max_grad_norm)
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", cfg.precision == "bf16")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", cfg.learning_rate)
    _fill(params, "betas", [cfg.adam_beta1, cfg.adam_beta2])
    _fill(params, "eps", cfg.adam_epsilon)
    _fill(params, "weight_decay", cfg.weight_decay)
    _fill_zero(ds, hidden_size, "deepspeed_config")
    if ds["zero_optimization"].get("stage") != 3:
        raise ConfigError(f"{source}: zero_optimization.stage must be 3 for the policy")
    _check_no_auto(ds, "", str(source))
    return ds


def resolve_reference_config(cfg: TrainConfig, hidden_size: int) -> dict[str, Any]:
    """The reference engine's config: ZeRO-3 inference, no optimizer, parameters on CPU when ref_offload."""
    source = cfg.ref_deepspeed_config or default_config_path("reference")
    ds = copy.deepcopy(_load_json(source, "ref_deepspeed_config"))
    if "optimizer" in ds:
        raise ConfigError(f"{source}: the reference engine must have no 'optimizer' block (it is never trained)")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", 1)
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed derives it from the two above and the world size
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", cfg.precision == "bf16")
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    offload = zero.setdefault("offload_param", {"device": "auto"})
    _fill(offload, "device", "cpu" if cfg.ref_offload else "none")
    if on_cpu():
        offload["pin_memory"] = False  # no pinned memory without a GPU
    _fill_zero(ds, hidden_size, "ref_deepspeed_config")
    _check_no_auto(ds, "", str(source))
    return ds


def _fill_zero(ds: dict, hidden_size: int, field_name: str) -> None:
    # Bucket sizes follow the model's width (the HF Trainer convention): one hidden x hidden matrix per bucket,
    # and parameters under 10 x hidden elements (norms, biases) stay unpartitioned.
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    _fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def attention_kernel(cfg: TrainConfig) -> str | None:
    """The `attn_implementation` to build models with; None leaves the model's default (see the field's help)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from transformers.utils import is_flash_attn_2_available

    if cfg.padding_free and cfg.precision == "bf16" and torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def load_sharded_model(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                       weights_loader: str = "streamed", attn_implementation: str | None = None):
    """The model at `path`, ZeRO-3 partitioned as it is built, so no rank ever holds the whole model.

    `streamed` (local safetensors directories): dpo_ds.loading reads each rank's slice of each tensor on
    rank 0 and sends it, so a rank holds its partition plus one chunk. Otherwise (`transformers`, hub ids,
    .bin files): `from_pretrained` under HfDeepSpeedConfig, where rank 0 maps the whole checkpoint.
    """
    if weights_loader == "streamed" and has_safetensors(path):
        return load_sharded_pretrained(path, ds_config, dtype, trust_remote_code, attn_implementation)
    return _load_with_transformers(path, ds_config, dtype, trust_remote_code, attn_implementation)


def _load_with_transformers(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                            attn_implementation: str | None):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay alive while from_pretrained runs
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation)
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()
    return model


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; norms and biases (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 parameters are flat partitions; ds_shape is the real one
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of learning_rate after `step` optimizer steps: linear warm-up, then constant/linear/cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _is_dropout_rate(name: str, value: Any) -> bool:
    return ("dropout" in name or name.endswith("pdrop")) and isinstance(value, (int, float)) \
        and not isinstance(value, bool)


def disable_dropout(model: torch.nn.Module) -> list[ConfigOverride]:
    """Dropout off for good, whatever mode the model is in (the policy trains in train mode): every dropout
    module gets p = 0, and every dropout rate a module copied from its config or reads from it while running
    (attention_dropout, resid_pdrop, ...) becomes 0. Returns the config values changed, which exports undo
    (hf_dir.saved_config)."""
    from transformers import PretrainedConfig

    configs = [("", model.config)] + [(name, value) for name, value in vars(model.config).items()
                                      if isinstance(value, PretrainedConfig)]
    originals = []
    for sub_config, config in configs:
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value) and value != 0:
                originals.append((sub_config, name, value))
                setattr(config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    return originals


def mark_expert_blocks(model: torch.nn.Module) -> int:
    """Make every block that holds its experts as separate modules (an `experts` ModuleList) one ZeRO-3 leaf.

    Tokens reach only some experts, and ranks route differently: per-expert modules would be fetched and
    run on one rank and not on another, and ZeRO-3's prefetch and gradient reduction would hang. As a leaf,
    the block's parameters are gathered and reduced together on every rank. transformers' own MoE models keep
    experts fused in one module that always runs, so this only acts on models that do not."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.ModuleList)}
    if classes:
        set_z3_leaf_modules(model, list(classes))
    return len(classes)


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> list[ConfigOverride]:
    """What the run changes on a freshly loaded policy or reference model, before DeepSpeed wraps it; returns
    the config values it changed."""
    overrides = disable_dropout(model) if cfg.disable_dropout else []
    mark_expert_blocks(model)
    return overrides


@dataclass
class PolicyEngine:
    """The policy's engine and what the run did to its model, declared here rather than stored on the model."""
    engine: deepspeed.DeepSpeedEngine
    config_overrides: list[ConfigOverride]  # undone in the config files the run writes (hf_dir.saved_config)
    adapters: Adapters | None               # LoRA: the peft handle; None for full fine-tuning


def build_policy_engine(cfg: TrainConfig, ds_config: dict[str, Any], total_steps: int) -> PolicyEngine:
    if cfg.lora_quantize is not None:  # QLoRA: the frozen base in 4 bits, partitioned by deepspeed.initialize
        model = load_quantized_base(cfg, model_dtype(cfg), attention_kernel(cfg))
    else:
        model = load_sharded_model(cfg.model_name_or_path, ds_config, model_dtype(cfg), cfg.trust_remote_code,
                                   cfg.weights_loader, attention_kernel(cfg))
    overrides = prepare_model(model, cfg)
    model.train()
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # LoRA: base frozen, only adapter parameters reach the optimizer
    adapters = attach_adapters(model, cfg) if uses_lora(cfg) else None
    schedule = lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_optimizer_groups(model, cfg.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    # NaN/Inf gradients on any rank make the all-reduced gradient norm non-finite; DeepSpeed (>= 0.19.8) then
    # skips the update on every rank in every precision and `was_step_applied()` is False.
    return PolicyEngine(engine, overrides, adapters)


def build_inference_engine(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                           weights_loader: str = "streamed", attn_implementation: str | None = None,
                           cfg: TrainConfig | None = None):
    """A frozen ZeRO-3 engine without optimizer, in eval mode (prepared as `cfg` says when given)."""
    model = load_sharded_model(path, ds_config, dtype, trust_remote_code, weights_loader, attn_implementation)
    if cfg is not None:
        prepare_model(model, cfg)
    else:
        mark_expert_blocks(model)
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
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


def _returns_head_output_unchanged(model_class: type) -> bool:
    """Whether `model_class.forward` binds `logits` exactly once, to `self.lm_head(...)`, and never updates it
    (augmented assignment or an in-place method): then the model returns lm_head's output as it is."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model_class.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    writes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(n, ast.Name) and n.id == "logits" for t in targets for n in ast.walk(t)):
                writes.append(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_")
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "logits"):
            return False
    return (len(writes) == 1 and isinstance(writes[0], ast.Assign) and isinstance(writes[0].value, ast.Call)
            and ast.unparse(writes[0].value.func) == "self.lm_head")


def fused_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection to score inside, or None where the logits path must be used (resolved once per
    engine: the engine's owner keeps it and passes it to `forward_logps`).

    Fusing replaces lm_head's output, so it is only done where the model returns `lm_head(hidden_states)`
    unchanged (Llama, Mistral, Mixtral, Qwen2/3 and their MoE variants, Phi-3, Gemma, OLMo-2, DeepSeek-V3, ...;
    not Gemma-2's soft-capping, Cohere's or Granite's scaling) and lm_head is a bias-free Linear.
    """
    head = model.get_output_embeddings()
    ok = (isinstance(head, torch.nn.Linear) and head.bias is None and _returns_head_output_unchanged(type(model)))
    if not ok:
        logger.info("fused_lm_head: %s does not return lm_head(hidden) unchanged; scoring from full logits",
                    type(model).__name__)
    return head if ok else None


def scoring_head(model: torch.nn.Module, fused_lm_head: bool) -> torch.nn.Linear | None:
    """The head `forward_logps` scores inside: `fused_head(model)` when the fused_lm_head field is on."""
    return fused_head(model) if fused_lm_head else None


@contextlib.contextmanager
def _scoring_head(head: torch.nn.Linear, score):
    """Within the block, calling `head` returns score(hidden) instead of logits. It is still called through the
    module, so ZeRO-3's hooks gather its weight for the forward and again for the backward."""
    head.forward = score
    try:
        yield
    finally:
        del head.forward


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: a plain copy from pageable memory synchronises
    the stream (the CPU would stop queueing work until the GPU caught up); from pinned memory it is async."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _varlen_attention_kwargs(position_ids: torch.Tensor, device) -> dict:
    """flash-attention's cumulative sequence lengths of a packed row, from the CPU batch: given to the model,
    they spare every layer recomputing them from the position ids (a nonzero and a max, each a device sync)."""
    starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(-1)
    cu = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    cu = to_device(cu, device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def forward_logps(engine, batch: dict[str, torch.Tensor], chunk_size: int,
                  head: torch.nn.Linear | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and token counts of every sequence of a collated batch (one forward).

    `head` (fused_lm_head: `fused_head` of the engine's model): scored inside this output projection; None:
    from the full logits."""
    sums, tokens, _ = forward_logps_and_aux(engine, batch, chunk_size, head, router_aux=False)
    return sums, tokens


def forward_logps_and_aux(engine, batch: dict[str, torch.Tensor], chunk_size: int, head: torch.nn.Linear | None,
                          router_aux: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`forward_logps`, plus the model's router load-balancing loss of the same forward when `router_aux`
    (mixture-of-experts models: `output_router_logits=True` makes transformers return it as `aux_loss`)."""
    device = engine.device
    input_ids = to_device(batch["input_ids"], device)
    loss_mask = to_device(batch["loss_mask"], device)
    # Sequence metadata comes from the CPU batch: read back from the device, it would cost a sync per micro-step.
    if "sequence_ids" in batch:  # packed: no attention mask, position ids mark where each sequence starts
        inputs = {"position_ids": to_device(batch["position_ids"], device)}
        scoring = (to_device(batch["sequence_ids"], device), int(batch["sequence_ids"].max()) + 1)
        if str(engine.module.config._attn_implementation).startswith("flash_attention"):
            inputs.update(_varlen_attention_kwargs(batch["position_ids"], device))
    else:
        inputs, scoring = {"attention_mask": to_device(batch["attention_mask"], device)}, (None, None)
    # LD-DPO (ld_alpha): per-token weights of the sums (logprobs.ld_token_weights, set by the step)
    weights = to_device(batch["token_weights"], device) if "token_weights" in batch else None
    if router_aux:
        inputs["output_router_logits"] = True
    if head is None:
        out = engine(input_ids=input_ids, use_cache=False, **inputs)
        return (*sequence_logps(out.logits, input_ids, loss_mask, chunk_size, *scoring, token_weights=weights),
                _aux_loss(out, router_aux))
    counts, scored = [], to_device(scored_positions(batch["loss_mask"]), device)

    def score(hidden: torch.Tensor) -> torch.Tensor:
        sums, tokens = head_sequence_logps(hidden, head.weight, input_ids, loss_mask, chunk_size, *scoring, scored=scored,
                                           token_weights=weights)
        counts.append(tokens)
        return sums

    with _scoring_head(head, score):
        out = engine(input_ids=input_ids, use_cache=False, **inputs)
    return out.logits, counts[0], _aux_loss(out, router_aux)


def _aux_loss(out, router_aux: bool) -> torch.Tensor | None:
    if not router_aux:
        return None
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        raise RuntimeError("router_aux_loss_coef > 0 but the model returned no aux_loss for output_router_logits")
    return aux
