"""Hugging Face safetensors export: sharded, streamed, validated before it is reported as done.

Two sources share one writer and one validator (dpo_ds.hf_dir):
- `export_engine`: a live ZeRO-3 engine (the run's `final/`). The parameters of one saved group (one
  tensor, or the fused tensors of one expert block) are gathered at a time, so no rank holds more than
  that; rank 0 appends each group's bytes to a data file, and puts the shards together (headers, multi-GB
  copies) only after the gathering loop, in `on_rank0`, where the other ranks wait for as long as rank 0 lives
  rather than in a collective that dist_timeout_s bounds.
- `convert_checkpoint` (`dpo-ds convert`): a dpo-ds checkpoint saved by any world size. DeepSpeed's
  fp32 partitions are memory-mapped and merged one tensor at a time (zero_to_fp32 lazy mode), so peak
  memory is a few shards, not the model (fp32 ZeRO stage 0 saves no partitions: its whole weights are read). A LoRA checkpoint (adapter only) gives the PEFT adapter, or the base
  model's own files streamed with the adapter merged in (`convert_lora_checkpoint`).
Both write what `save_pretrained` writes (dpo_ds.layout): the checkpoint layout transformers loads from
(per-expert MoE tensors, not the fused in-memory ones), no tied aliases, dropout as the config had it.
Both write under a temporary name and rename only after validation (every tensor present, with the shape
the model config implies, non-empty, finite), so a crash never leaves a directory that looks complete.
"""
from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path
from typing import Sequence

import torch

from dpo_ds import lora
from dpo_ds.checkpoint import DS_TAG, HF_METADATA, verify_checkpoint
from dpo_ds.console import emit
from dpo_ds.hf_dir import (
    ConfigOverride,
    ExportError,
    meta_model,
    publish_dir,
    saved_config,
    validate_hf_dir,
    write_hf_metadata,
    write_on_rank0,
)
from dpo_ds.families import load_model_config
from dpo_ds.layout import saved_layout, state_tensors, to_saved_layout
from dpo_ds.safetensors_io import ShardWriter, checkpoint_files, parse_size, read_headers, read_tensor
from launcher.dist import process_rank

HELP = """Convert a dpo-ds checkpoint (checkpoints/step-N) to a Hugging Face safetensors directory for serving
(vLLM, transformers): shards + model.safetensors.index.json, config.json, generation_config.json and the
run's tokenizer files. Streams tensors (bounded memory) and validates the result before reporting success.
A LoRA checkpoint (adapter weights only) gives the base model with the adapter merged in (read from the base
model's directory; for QLoRA too the original base weights, not their nf4 approximation), or with --adapter_only
the PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
REOPEN_BYTES = 64 << 20
logger = logging.getLogger("dpo_ds")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_engine(engine, out_dir: str, tokenizer=None, dtype: torch.dtype | None = None,
                  max_shard_size: str = "5GB", config_overrides: Sequence[ConfigOverride] = ()) -> None:
    """Write `engine.module` as `save_pretrained` would (dpo_ds.layout: checkpoint layout, no tied aliases) on
    rank 0, its config with the run's `config_overrides` undone; every rank must call this."""
    import deepspeed

    model = engine.module
    rank = process_rank()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, parse_size(max_shard_size)) if rank == 0 else None
    groups, expected = saved_layout(model)
    live = state_tensors(model)
    write_errors: list[OSError] = []
    for names in groups:  # the tensors one saved group is made of, gathered together (one expert block at most)
        zero_params = list({id(live[n]): live[n] for n in names if hasattr(live[n], "ds_id")}.values())
        with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=None, enabled=bool(zero_params)):
            if writer is not None and not write_errors:
                try:
                    for name, tensor in to_saved_layout(model, {n: live[n].detach() for n in names}).items():
                        writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
                except OSError as err:  # rank 0 keeps taking part in every gather; publish() reports it
                    write_errors.append(err)

    def publish() -> None:
        if write_errors:
            raise write_errors[0]
        writer.finish()
        write_hf_metadata(tmp, saved_config(model, config_overrides), getattr(model, "generation_config", None), tokenizer, dtype)
        validate_hf_dir(tmp, expected)
        publish_dir(tmp, out)

    write_on_rank0(f"writing the model to {out}", publish, tmp)


def convert_checkpoint(checkpoint_dir: str, out_dir: str, dtype: str = "bf16", max_shard_size: str = "5GB",
                       adapter_only: bool = False, checksums: bool = True) -> Path:
    """A dpo-ds checkpoint -> a validated Hugging Face directory (single process, any saved world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer, GenerationConfig


    ckpt = Path(checkpoint_dir)
    verify_checkpoint(ckpt, checksums)
    if is_lora_checkpoint(ckpt):
        return convert_lora_checkpoint(ckpt, out_dir, DTYPES[dtype], max_shard_size, adapter_only)
    if adapter_only:
        raise ExportError(f"{ckpt}: --adapter_only needs a LoRA checkpoint; this one is a full fine-tune")
    meta = ckpt / HF_METADATA
    config = load_model_config(str(meta))
    generation_config = GenerationConfig.from_pretrained(meta) if (meta / "generation_config.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(meta)
    model = meta_model(config)
    groups, shapes = saved_layout(model)

    def open_partitions():
        if not any((ckpt / DS_TAG).glob("*optim_states.pt")):  # fp32 ZeRO stage 0: the weights are whole
            return torch.load(ckpt / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)["module"]
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG, lazy_mode=True)

    lazy = open_partitions()
    missing = [name for names in groups for name in names if name not in lazy]
    if missing:
        raise ExportError(f"{ckpt / DS_TAG}: checkpoint lacks tensors the model config needs: {missing[:5]}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, parse_size(max_shard_size))
    target = DTYPES[dtype]
    merged = 0
    for names in groups:  # tied aliases in the checkpoint are left out and the checkpoint layout restored, as HF does
        saved = to_saved_layout(model, {name: lazy[name].contiguous() for name in names})
        for name, tensor in saved.items():
            writer.add(name, tensor.to(target) if tensor.is_floating_point() else tensor)
            merged += tensor.numel() * tensor.element_size()
        del saved
        if merged >= REOPEN_BYTES:
            # The partitions are memory-mapped and every page read stays mapped (and in RSS) while they are
            # open: reopen them every REOPEN_BYTES merged, so the mapping never covers the model.
            lazy, merged = None, 0
            gc.collect()
            lazy = open_partitions()
    del lazy
    gc.collect()
    writer.finish()
    write_hf_metadata(tmp, config, generation_config, tokenizer, target)
    validate_hf_dir(tmp, shapes)
    publish_dir(tmp, out)
    return out


def is_lora_checkpoint(ckpt: Path) -> bool:
    return (ckpt / HF_METADATA / lora.ADAPTER_CONFIG).is_file()


def export_merged_from_base(engine, adapters: lora.Adapters, out_dir: str, tokenizer, dtype: torch.dtype,
                            config_overrides: Sequence[ConfigOverride] = ()) -> None:
    """QLoRA's `final/`: the trained adapter merged into the ORIGINAL base weights, streamed from the model
    directory on rank 0 (the live base holds only their nf4 approximation); every rank must call this."""
    tensors = lora.gather_adapter(engine)
    model = engine.module

    def write() -> None:
        logger.info("QLoRA: merging the adapter into the original base weights of %s (not the nf4-dequantized "
                    "weights the run trained against) -> %s", adapters.config.base_model_name_or_path, out_dir)
        write_merged_model(adapters.config, tensors, saved_config(model, config_overrides),
                           getattr(model, "generation_config", None), tokenizer, Path(out_dir), dtype, "5GB")

    write_on_rank0(f"writing {out_dir}", write, Path(out_dir).with_name(Path(out_dir).name + ".tmp"))


def convert_lora_checkpoint(ckpt: Path, out_dir: str, dtype: torch.dtype, max_shard_size: str,
                            adapter_only: bool) -> Path:
    """A LoRA checkpoint (adapter weights only) -> the PEFT adapter, or the base model with it merged in
    (write_merged_model; QLoRA too: the original base weights, never their nf4 approximation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig
    from transformers import AutoTokenizer, GenerationConfig

    meta = ckpt / HF_METADATA
    config = LoraConfig.from_pretrained(str(meta))
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG, exclude_frozen_parameters=True)
    tensors = {lora.peft_key(n): t for n, t in state.items() if f".{lora.ADAPTER}." in n and ".lora_" in n}
    if not tensors:
        raise ExportError(f"{ckpt / DS_TAG}: no adapter weights in this LoRA checkpoint")
    out = Path(out_dir)
    if adapter_only:
        lora.write_adapter_dir(config, tensors, out)
        return out
    generation_config = GenerationConfig.from_pretrained(meta) if (meta / "generation_config.json").is_file() else None
    write_merged_model(config, tensors, load_model_config(str(meta)), generation_config,
                       AutoTokenizer.from_pretrained(meta), out, dtype, max_shard_size)
    return out


def write_merged_model(config, tensors: dict[str, torch.Tensor], hf_config, generation_config, tokenizer, out: Path,
                       dtype: torch.dtype, max_shard_size: str) -> None:
    """The base model with the adapter (`tensors`, keyed as PEFT saves them) merged in, as a model directory.

    Streams the base model's own safetensors files one tensor at a time and adds B A * alpha / r to each
    adapted weight, so it keeps the base checkpoint's names and layout and never holds the whole model."""
    base = config.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ExportError(f"{lora.ADAPTER_CONFIG}: base model {base!r} (base_model_name_or_path) is not a local "
                          f"directory; the merged model needs the base weights (or pass --adapter_only)")
    scaling = config.lora_alpha / config.r
    deltas: dict[str, torch.Tensor] = {}  # base weight name -> B A * scaling
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key[len(lora.PEFT_PREFIX):].split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = lora.lora_delta(a, b, scaling, config.fan_in_fan_out)
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
    publish_dir(tmp, out)


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint_dir", help="A checkpoint directory, e.g. OUTPUT_DIR/checkpoints/step-00001000.")
    parser.add_argument("out_dir", help="Hugging Face directory to write (replaced only once the new one is valid).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="Weight dtype (default bf16).")
    parser.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard, e.g. 5GB, 500MB (default 5GB).")
    parser.add_argument("--adapter_only", action="store_true",
                        help="LoRA checkpoints: write the PEFT adapter (fp32) instead of the merged model.")
    parser.add_argument("--skip_checksums", action="store_true",
                        help="Check the checkpoint's files against the manifest by size only, without reading them "
                             "for their xxh3-128 digests (faster; a same-size corruption goes unnoticed).")


def run(args) -> int:
    out = convert_checkpoint(args.checkpoint_dir, args.out_dir, args.dtype, args.max_shard_size, args.adapter_only,
                             checksums=not args.skip_checksums)
    emit(f"wrote {out}")
    return 0
