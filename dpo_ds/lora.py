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
import hashlib
import logging
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpo_ds.config import ConfigError, TrainConfig, uses_reference

ADAPTER = "default"      # the trained adapter (peft's default name)
REFERENCE = "reference"  # the frozen copy of the starting adapter (lora_adapter runs)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the transformers model

logger = logging.getLogger(__name__)


class Adapters:
    """The peft handle of a LoRA policy: which adapter is active, and its config. Kept in the transformers
    model's __dict__ (not as a submodule: the engine must not see the wrapper's parameters twice)."""

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
    from dpo_ds.loading import has_safetensors

    if not has_safetensors(cfg.model_name_or_path):  # checked here: `dpo-ds bench` writes its model directory late
        raise ConfigError(f"field 'lora_quantize': nf4 needs model_name_or_path to be a local safetensors model "
                          f"directory ({cfg.model_name_or_path} is not): final/ merges the adapter into the original "
                          f"base weights read from there", "lora_quantize")
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.lora_quantize,
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                      bnb_4bit_quant_storage=dtype)
    return AutoModelForCausalLM.from_pretrained(
        cfg.model_name_or_path, dtype=dtype, quantization_config=quantization, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attn_implementation, device_map={"": get_accelerator().current_device_name()})


@contextlib.contextmanager
def peft_model_built():
    """Around building a PeftModel: peft 0.21's PeftModel.__init__ reads transformers' `is_gradient_checkpointing`,
    which transformers 5 deprecated (one FutureWarning per model; peft's code, not ours to change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def adapters_of(model: torch.nn.Module) -> Adapters | None:
    return model.__dict__.get("_dpo_ds_lora")


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


def attach_adapters(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Inject LoRA layers into `model` (ZeRO-3 partitioned, frozen) and return it; only adapter parameters
    require grad. Call before deepspeed.initialize, which partitions the new adapter parameters: every rank
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
    if cfg.gradient_checkpointing and not hasattr(model, "_require_grads_hook"):
        # checkpointed blocks of a frozen base: the embeddings' output must carry grad into the first block
        model.enable_input_require_grads()
    model.__dict__["_dpo_ds_lora"] = Adapters(peft_model, cfg.model_name_or_path)
    return model


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


def _peft_key(name: str) -> str:
    """transformers-model parameter name -> key in adapter_model.safetensors (adapter name dropped)."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")


def gather_adapter(engine) -> dict[str, torch.Tensor]:
    """The trained adapter's fp32 master weights, full, on every rank (a collective), keyed as PEFT saves them."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in trainable_adapter_params(engine.module):
        full = safe_get_full_fp32_param(p)
        out[_peft_key(name)] = full.detach().float().cpu().clone()
    return out


def write_adapter_dir(config, tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, written under a temporary name, checked, then renamed."""
    from dpo_ds.convert import ExportError, _publish

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
    _publish(tmp, out_dir)


def save_adapter_config(config, out_dir: Path) -> None:
    import copy

    config = copy.deepcopy(config)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out_dir))


def export_lora(engine, cfg: TrainConfig, out_dir: Path, tokenizer, dtype: torch.dtype) -> None:
    """The end of a LoRA run (every rank must call): `final_adapter/` (the PEFT adapter), then `final/`, the
    merged model. LoRA merges into the live engine's base and exports it; QLoRA merges into the original base
    weights, streamed from the model directory on rank 0 (the live base holds only their nf4 approximation)."""
    from dpo_ds.convert import ExportError, export_engine, saved_config
    from launcher.dist import on_rank0

    adapters = adapters_of(engine.module)
    tensors = gather_adapter(engine)
    on_rank0(f"writing {out_dir / 'final_adapter'}",
             lambda: write_adapter_dir(adapters.config, tensors, out_dir / "final_adapter"), ExportError)
    if cfg.lora_quantize is None:
        merge_adapter(engine)
        export_engine(engine, str(out_dir / "final"), tokenizer=tokenizer, dtype=None)
        return
    model = engine.module

    def write() -> None:
        logger.info("QLoRA: merging the adapter into the original base weights of %s (not the nf4-dequantized "
                    "weights the run trained against) -> %s", adapters.config.base_model_name_or_path, out_dir / "final")
        write_merged_model(adapters.config, tensors, saved_config(model), getattr(model, "generation_config", None),
                           tokenizer, out_dir / "final", dtype, "5GB")

    on_rank0(f"writing {out_dir / 'final'}", write, ExportError)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    delta = (b.float() @ a.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def merge_adapter(engine) -> None:
    """Merge the trained adapter into the base weights of the live engine and remove the LoRA layers, so the
    engine's module is the plain model the export writes. W += B A * alpha / r in fp32 from the optimizer's
    master weights, one layer gathered at a time (every rank must call)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from peft.tuners.lora import Linear as LoraLinear

    adapters = adapters_of(engine.module)
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


def convert_lora_checkpoint(ckpt: Path, out_dir: str, dtype: torch.dtype, max_shard_size: str,
                            adapter_only: bool) -> Path:
    """A LoRA checkpoint (adapter weights only) -> the PEFT adapter, or the base model with it merged in
    (write_merged_model; QLoRA too: the original base weights, never their nf4 approximation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from dpo_ds.checkpoint import DS_TAG, HF_METADATA
    from dpo_ds.convert import ExportError

    meta = ckpt / HF_METADATA
    config = LoraConfig.from_pretrained(str(meta))
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG, exclude_frozen_parameters=True)
    tensors = {_peft_key(n): t for n, t in state.items() if f".{ADAPTER}." in n and ".lora_" in n}
    if not tensors:
        raise ExportError(f"{ckpt / DS_TAG}: no adapter weights in this LoRA checkpoint")
    out = Path(out_dir)
    if adapter_only:
        write_adapter_dir(config, tensors, out)
        return out
    generation_config = GenerationConfig.from_pretrained(meta) if (meta / "generation_config.json").is_file() else None
    write_merged_model(config, tensors, AutoConfig.from_pretrained(meta), generation_config,
                       AutoTokenizer.from_pretrained(meta), out, dtype, max_shard_size)
    return out


def write_merged_model(config, tensors: dict[str, torch.Tensor], hf_config, generation_config, tokenizer, out: Path,
                       dtype: torch.dtype, max_shard_size: str) -> None:
    """The base model with the adapter (`tensors`, keyed as PEFT saves them) merged in, as a model directory.

    Streams the base model's own safetensors files one tensor at a time and adds B A * alpha / r to each
    adapted weight, so it keeps the base checkpoint's names and layout and never holds the whole model."""
    from dpo_ds.convert import ExportError, ShardWriter, _publish, meta_model, parse_size, validate_hf_dir, write_hf_metadata
    from dpo_ds.layout import saved_layout
    from dpo_ds.loading import checkpoint_files, read_headers, read_tensor

    base = config.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ExportError(f"{ADAPTER_CONFIG}: base model {base!r} (base_model_name_or_path) is not a local "
                          f"directory; the merged model needs the base weights (or pass --adapter_only)")
    scaling = config.lora_alpha / config.r
    deltas: dict[str, torch.Tensor] = {}  # base weight name -> B A * scaling
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key[len(PEFT_PREFIX):].split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = lora_delta(a, b, scaling, config.fan_in_fan_out)
    shapes = saved_layout(meta_model(hf_config))[1]  # what save_pretrained writes: the base files' layout
    stored = read_headers(checkpoint_files(base))  # name -> where its bytes lie in the base files
    unmatched = sorted(set(deltas) - set(stored))
    if unmatched:
        raise ExportError(f"{base}: adapted weights {unmatched[:3]} are not stored under these names in the base "
                          f"checkpoint; use --adapter_only")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, parse_size(max_shard_size))
    for name in shapes:
        if name not in stored:
            raise ExportError(f"{base}: base checkpoint lacks {name}")
        tensor = read_tensor(stored[name])
        if name in deltas:
            tensor = tensor.float() + deltas[name]
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        del tensor
    writer.finish()
    write_hf_metadata(tmp, hf_config, generation_config, tokenizer, dtype)
    validate_hf_dir(tmp, shapes)
    _publish(tmp, out)


def is_lora_checkpoint(ckpt: Path) -> bool:
    from dpo_ds.checkpoint import HF_METADATA

    return (ckpt / HF_METADATA / ADAPTER_CONFIG).is_file()


def checkpoint_metadata(model: torch.nn.Module, hf_dir: Path) -> None:
    """Next to the model config in a checkpoint: the adapter's config (marks the checkpoint as LoRA)."""
    adapters = adapters_of(model)
    if adapters is not None:
        save_adapter_config(adapters.config, hf_dir)


def is_lora_engine(engine) -> bool:
    return adapters_of(engine.module) is not None
