"""LoRA DPO on peft: adapters trained on a frozen ZeRO-3 base, the reference for free.

The policy engine wraps the transformers model with peft's LoRA layers injected (`PeftModel.base_model.model`),
so scoring, the fused head and the export see an ordinary causal LM. The reference is the same engine:
- fresh adapter: the base with the adapter layers disabled;
- `lora_adapter`: the starting adapter is loaded twice, as `default` (trained) and `reference` (frozen, never
  in the optimizer), and the reference forward switches to `reference`.
Only adapter parameters reach the optimizer, checkpoints leave the frozen weights out, and the run ends with
`final_adapter/` (a PEFT adapter) and `final/` (the adapter merged into the base, W + B A * alpha / r).

QLoRA (`lora_quantize: nf4`): the frozen base is loaded quantized to 4-bit NormalFloat by transformers +
bitsandbytes (`load_quantized_base`), and `final/` merges the adapter into the ORIGINAL base weights read from
the model directory, not into the dequantized nf4 weights the run trained against.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpo_ds.config import ConfigError, TrainConfig, uses_reference
from dpo_ds.hf_dir import ExportError, publish_dir, write_on_rank0
from dpo_ds.safetensors_io import has_safetensors

ADAPTER = "default"      # the trained adapter (peft's default name)
REFERENCE = "reference"  # the frozen copy of the starting adapter (lora_adapter runs)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the transformers model

# peft imports bitsandbytes whenever it is installed, also for plain LoRA; on CPUs with AVX512-BF16 bitsandbytes then
# looks for a hub kernel (the `kernels` package) and warns on every rank when it cannot have it, before falling back to
# its own kernel: nothing a dpo-ds user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class Adapters:
    """The peft handle of a LoRA policy: which adapter is active, and its config. Held by the run
    (engines.PolicyEngine), not by the model: as a submodule, the engine would see the wrapper's parameters twice."""

    def __init__(self, peft_model, base_model_path: str):
        self.peft_model = peft_model
        self.config = peft_model.peft_config[ADAPTER]
        self.config.base_model_name_or_path = base_model_path
        self.has_reference_copy = REFERENCE in peft_model.peft_config

    @contextlib.contextmanager
    def as_reference(self, model: torch.nn.Module):
        """Within the block, `model` computes the reference: eval mode (no dropout), the trained adapter off."""
        was_training = model.training
        model.eval()
        try:
            if self.has_reference_copy:
                self.peft_model.base_model.set_adapter(REFERENCE, inference_mode=True)
                try:
                    yield
                finally:
                    self.peft_model.base_model.set_adapter(ADAPTER)
            else:
                with self.peft_model.disable_adapter():
                    yield
        finally:
            model.train(was_training)


def load_quantized_base(cfg: TrainConfig, dtype: torch.dtype, attn_implementation: str | None) -> torch.nn.Module:
    """QLoRA: the base model with every Linear but the output layer quantized to nf4 (double-quantized absmax),
    whole on this rank; deepspeed.initialize then partitions it.

    transformers' QLoRA + ZeRO-3 recipe: no zero.Init (transformers builds quantized models without it), and the
    packed 4-bit weights are stored as tensors of the compute dtype (`bnb_4bit_quant_storage`), so ZeRO-3
    partitions, gathers and freezes them like any other parameter. Until then each rank holds the whole 4-bit
    model (0.5 byte per quantized parameter); the quantization constants (absmax) are not parameters and stay
    whole on every rank."""
    if not has_safetensors(cfg.model_name_or_path):  # checked here: `dpo-ds bench` writes its model directory late
        raise ConfigError(f"field 'lora_quantize': nf4 needs model_name_or_path to be a local safetensors model "
                          f"directory ({cfg.model_name_or_path} is not): final/ merges the adapter into the original "
                          f"base weights read from there", "lora_quantize")
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.lora_quantize,
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                      bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_name_or_path, dtype=dtype, quantization_config=quantization, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attn_implementation, device_map={"": get_accelerator().current_device_name()})
    # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's 4-bit weight in place for its own kernel the first time
    # the layer runs in eval mode without gradients (the reference pass, evaluation), and undoes it in state_dict
    # assuming uint8 storage; ours is the compute dtype (so that ZeRO-3 shards it), and the next checkpoint would
    # fail. The weights stay as ZeRO-3 holds them.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@contextlib.contextmanager
def peft_model_built():
    """Around building a PeftModel: peft 0.21's PeftModel.__init__ reads transformers' `is_gradient_checkpointing`,
    which transformers 5 deprecated (one FutureWarning per model; peft's code, not ours to change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """all-linear: the names of every nn.Linear but the output layer. Resolved here rather than by peft, whose
    all-linear also wraps fused MoE expert parameters, which the merged export cannot merge."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def _fresh_config(model: torch.nn.Module, cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules.strip()
    names = linear_module_names(model) if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=names,
                      bias="none", task_type="CAUSAL_LM")


def attach_adapters(model: torch.nn.Module, cfg: TrainConfig, gradient_checkpointing: bool) -> Adapters:
    """Inject LoRA layers into `model` (ZeRO-3 partitioned, frozen) in place; only adapter parameters require
    grad. Returns the peft handle. Call before deepspeed.initialize, which partitions the new adapter parameters: every rank
    must hold the same values, hence the seeded initialisation."""
    from peft import PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    with peft_model_built():
        try:
            if cfg.lora_adapter is not None:
                peft_model = PeftModel.from_pretrained(model, cfg.lora_adapter, adapter_name=ADAPTER, is_trainable=True)
                if uses_reference(cfg):
                    peft_model.load_adapter(cfg.lora_adapter, adapter_name=REFERENCE, is_trainable=False)
                    peft_model.set_adapter(ADAPTER)
                    model.train()  # load_adapter leaves the model in eval mode (no activation checkpointing there)
            else:
                peft_model = get_peft_model(model, _fresh_config(model, cfg))
        except ValueError as err:  # peft: target modules not found, adapter made for another model, ...
            field_name = "lora_adapter" if cfg.lora_adapter is not None else "lora_target_modules"
            raise ConfigError(f"field '{field_name}': {err}", field_name) from None
    supported = _merge_supported_layers(cfg.lora_quantize is not None)
    unsupported = sorted({type(m.get_base_layer()).__name__ for m in model.modules()
                          if isinstance(m, LoraLayer) and not isinstance(m, supported)})
    if unsupported:  # the merged export (W + B A * alpha / r) is written for Linear layers
        raise ConfigError(f"LoRA on {', '.join(unsupported)} layers is not supported (only Linear); choose "
                          f"lora_target_modules (or an adapter) that names Linear modules only", "lora_target_modules")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"field 'lora_target_modules': {cfg.lora_target_modules!r} matched no module of "
                          f"{cfg.model_name_or_path}", "lora_target_modules")
    if gradient_checkpointing and not hasattr(model, "_require_grads_hook"):
        # checkpointed blocks of a frozen base: the embeddings' output must carry grad into the first block
        model.enable_input_require_grads()
    return Adapters(peft_model, cfg.model_name_or_path)


def _merge_supported_layers(quantized: bool) -> tuple[type, ...]:
    """peft's LoRA layers the merged export handles: Linear, and (QLoRA) Linear over a bitsandbytes 4-bit base,
    whose merge reads the original weights from disk (peft defines that class only where bitsandbytes is
    installed)."""
    from peft.tuners.lora import Linear as LoraLinear

    if not quantized:
        return (LoraLinear,)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return (LoraLinear, LoraLinear4bit)


def trainable_adapter_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name in the transformers model, parameter) of the trained adapter, in module order."""
    return [(n, p) for n, p in model.named_parameters() if f".{ADAPTER}." in n and ".lora_" in n]


def peft_key(name: str) -> str:
    """transformers-model parameter name -> key in adapter_model.safetensors (adapter name dropped)."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")


def gather_adapter(engine) -> dict[str, torch.Tensor]:
    """The trained adapter's fp32 master weights, full, on every rank (a collective), keyed as PEFT saves them."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in trainable_adapter_params(engine.module):
        full = safe_get_full_fp32_param(p)
        out[peft_key(name)] = full.detach().float().cpu().clone()
    return out


def write_adapter_dir(config, tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, written under a temporary name, checked, then renamed."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter_config(config, tmp)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    reread = load_file(str(tmp / ADAPTER_WEIGHTS))
    if set(reread) != set(tensors) or not tensors:
        raise ExportError(f"{tmp / ADAPTER_WEIGHTS}: adapter tensors missing after writing")
    bad = [k for k, v in reread.items() if not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"{tmp / ADAPTER_WEIGHTS}: {bad[0]} contains NaN or Inf")
    publish_dir(tmp, out_dir)


def save_adapter_config(config, out_dir: Path) -> None:
    config = copy.deepcopy(config)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out_dir))


def save_adapter(engine, adapters: Adapters, out_dir: str) -> None:
    """`final_adapter/`: the trained adapter as a PEFT directory (rank 0 writes; every rank must call)."""
    tensors = gather_adapter(engine)
    write_on_rank0(f"writing {out_dir}", lambda: write_adapter_dir(adapters.config, tensors, Path(out_dir)),
                   Path(out_dir).with_name(Path(out_dir).name + ".tmp"))


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    delta = (b.float() @ a.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def merge_adapter(engine, adapters: Adapters) -> None:
    """Merge the trained adapter into the base weights of the live engine and remove the LoRA layers, so the
    engine's module is the plain model the export writes. W += B A * alpha / r in fp32 from the optimizer's
    master weights, one layer gathered at a time (every rank must call)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from peft.tuners.lora import Linear as LoraLinear

    for module in engine.module.modules():
        if not isinstance(module, LoraLinear) or ADAPTER not in module.lora_A:  # attach_adapters allows no other
            continue
        a = safe_get_full_fp32_param(module.lora_A[ADAPTER].weight)
        b = safe_get_full_fp32_param(module.lora_B[ADAPTER].weight)
        weight = module.get_base_layer().weight
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0, enabled=hasattr(weight, "ds_id")):
            merged = weight.data.float() + lora_delta(a, b, module.scaling[ADAPTER], module.fan_in_fan_out).to(weight.device)
            weight.data.copy_(merged.to(weight.dtype))
    adapters.peft_model.base_model.unload()


# --- checkpoints ---------------------------------------------------------------------------------------------

def adapter_fingerprint(path: str) -> str:
    """Digest of an adapter directory's config and weights (contents: adapters of one shape differ only there)."""
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        f = Path(path) / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:24]
