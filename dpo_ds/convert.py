"""Hugging Face safetensors export: sharded, streamed, validated before it is reported as done.

Two sources share one writer and one validator:
- `export_engine`: a live ZeRO-3 engine (the run's `final/`). The parameters of one saved group (one
  tensor, or the fused tensors of one expert block) are gathered at a time, so no rank holds more than
  that plus one output shard.
- `convert_checkpoint` (`dpo-ds convert`): a dpo-ds checkpoint saved by any world size. DeepSpeed's
  fp32 partitions are memory-mapped and merged one tensor at a time (zero_to_fp32 lazy mode), so peak
  memory is a few shards, not the model.
Both write what `save_pretrained` writes (dpo_ds.layout): the checkpoint layout transformers loads from
(per-expert MoE tensors, not the fused in-memory ones), no tied aliases, dropout as the config had it.
Both write under a temporary name and rename only after validation (every tensor present, with the shape
the model config implies, non-empty, finite), so a crash never leaves a directory that looks complete.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from dpo_ds.cli import emit
from launcher.dist import on_rank0

HELP = """Convert a dpo-ds checkpoint (checkpoints/step-N) to a Hugging Face safetensors directory for serving
(vLLM, transformers): shards + model.safetensors.index.json, config.json, generation_config.json and the
run's tokenizer files. Streams tensors (bounded memory) and validates the result before reporting success.
A LoRA checkpoint (adapter weights only) gives the base model with the adapter merged in (read from the base
model's directory; for QLoRA too the original base weights, not their nf4 approximation), or with --adapter_only
the PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
INDEX_NAME = "model.safetensors.index.json"
REOPEN_BYTES = 64 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ExportError(RuntimeError):
    pass


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class ShardWriter:
    """Writes safetensors shards of at most `max_shard_bytes`, holding one tensor in memory at a time.

    safetensors' own writer needs a whole shard in memory, so each tensor's bytes go straight to the shard's
    data file as it arrives; when the shard is full, its header (8-byte length, JSON, padded to 8 bytes) is
    written and the data streamed behind it. The result is read back by `validate_hf_dir`.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.entries: dict[str, dict] = {}  # the open shard's header entries
        self.data = None                     # the open shard's data file
        self.offset = 0
        self.shards: list[list[str]] = []    # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.offset + size > self.max_shard_bytes:
            self._close_shard()
        if self.data is None:
            self.data = (self.out_dir / f"shard-{len(self.shards):05d}.data").open("wb")
        self.data.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + size]}
        self.offset += size
        self.total_bytes += size

    def _close_shard(self) -> None:
        data_path = Path(self.data.name)
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with (self.out_dir / f"shard-{len(self.shards):05d}.tmp").open("wb") as out, data_path.open("rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        data_path.unlink()
        self.shards.append(list(self.entries))
        self.entries, self.data, self.offset = {}, None, 0

    def finish(self) -> dict[str, str]:
        """Rename shards to model-0000i-of-0000n.safetensors and write the index; returns weight_map."""
        if self.entries:
            self._close_shard()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i:05d}.tmp", self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        return weight_map


def validate_hf_dir(out_dir: Path, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present once, with its shape, non-empty and finite; every shard listed exists."""
    index_path = out_dir / INDEX_NAME
    if not index_path.is_file():
        raise ExportError(f"{index_path}: missing")
    weight_map = json.loads(index_path.read_text())["weight_map"]
    missing = sorted(set(expected_shapes) - set(weight_map))
    extra = sorted(set(weight_map) - set(expected_shapes))
    if missing or extra:
        raise ExportError(f"{index_path}: missing tensors {missing[:5]} / unexpected tensors {extra[:5]}")
    for shard in sorted(set(weight_map.values())):
        path = out_dir / shard
        if not path.is_file():
            raise ExportError(f"{path}: listed in {INDEX_NAME} but missing")
        try:
            with safe_open(str(path), "pt") as fh:
                names = list(fh.keys())
            for name in names:
                if weight_map.get(name) != shard:
                    raise ExportError(f"{path}: tensor {name} is not indexed to this shard")
                # one tensor per opening: a shard's pages stay mapped (and in RSS) while it is open
                with safe_open(str(path), "pt") as fh:
                    tensor = fh.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected_shapes[name]) or tensor.numel() == 0:
                    raise ExportError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(expected_shapes[name])}")
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ExportError(f"{path}: {name} contains NaN or Inf")
                del tensor
        except ExportError:
            raise
        except Exception as err:  # truncated or corrupt file
            raise ExportError(f"{path}: unreadable safetensors file ({err})") from None


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the validated tmp dir; the old one is removed only after the new one is in place."""
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_engine(engine, out_dir: str, tokenizer=None, dtype: torch.dtype | None = None,
                  max_shard_size: str = "5GB") -> None:
    """Write `engine.module` as `save_pretrained` would (dpo_ds.layout: checkpoint layout, no tied aliases) on
    rank 0; every rank must call this."""
    import deepspeed

    from dpo_ds.layout import saved_layout, state_tensors, to_saved_layout

    model = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, parse_size(max_shard_size)) if rank == 0 else None
    groups, expected = saved_layout(model)
    live = state_tensors(model)
    for names in groups:  # the tensors one saved group is made of, gathered together (one expert block at most)
        zero_params = list({id(live[n]): live[n] for n in names if hasattr(live[n], "ds_id")}.values())
        with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=None, enabled=bool(zero_params)):
            if writer is not None:
                for name, tensor in to_saved_layout(model, {n: live[n].detach() for n in names}).items():
                    writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)

    def publish() -> None:
        writer.finish()
        write_hf_metadata(tmp, saved_config(model), getattr(model, "generation_config", None), tokenizer, dtype)
        validate_hf_dir(tmp, expected)
        _publish(tmp, out)

    on_rank0(f"writing the model to {out}", publish)


def saved_config(model):
    """The model's config as the user gave it: the run's overrides (engines.disable_dropout, QLoRA's
    quantization) undone."""
    import copy

    config = copy.deepcopy(model.config)
    # QLoRA: the run's nf4 quantization of the frozen base is no property of the model written
    for name in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(name, None)
    for sub_config, name, value in model.__dict__.get("_dpo_ds_config_originals", ()):
        setattr(getattr(config, sub_config) if sub_config else config, name, value)
    return config


def write_hf_metadata(tmp: Path, config, generation_config, tokenizer, dtype: torch.dtype | None = None) -> None:
    """config.json (with the weights' dtype), generation_config.json and the tokenizer files."""
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def meta_model(config):
    """A weightless (meta-device) model of `config`: the names, shapes and layout it saves."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def convert_checkpoint(checkpoint_dir: str, out_dir: str, dtype: str = "bf16", max_shard_size: str = "5GB",
                       adapter_only: bool = False) -> Path:
    """A dpo-ds checkpoint -> a validated Hugging Face directory (single process, any saved world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from dpo_ds.checkpoint import DS_TAG, HF_METADATA, verify_checkpoint
    from dpo_ds.layout import saved_layout, to_saved_layout
    from dpo_ds.lora import convert_lora_checkpoint, is_lora_checkpoint

    ckpt = Path(checkpoint_dir)
    verify_checkpoint(ckpt)
    if is_lora_checkpoint(ckpt):
        return convert_lora_checkpoint(ckpt, out_dir, DTYPES[dtype], max_shard_size, adapter_only)
    if adapter_only:
        raise ExportError(f"{ckpt}: --adapter_only needs a LoRA checkpoint; this one is a full fine-tune")
    meta = ckpt / HF_METADATA
    config = AutoConfig.from_pretrained(meta)
    generation_config = GenerationConfig.from_pretrained(meta) if (meta / "generation_config.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(meta)
    model = meta_model(config)
    groups, shapes = saved_layout(model)

    def open_partitions():
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
    _publish(tmp, out)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint_dir", help="A checkpoint directory, e.g. OUTPUT_DIR/checkpoints/step-00001000.")
    parser.add_argument("out_dir", help="Hugging Face directory to write (replaced only once the new one is valid).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="Weight dtype (default bf16).")
    parser.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard, e.g. 5GB, 500MB (default 5GB).")
    parser.add_argument("--adapter_only", action="store_true",
                        help="LoRA checkpoints: write the PEFT adapter (fp32) instead of the merged model.")


def run(args) -> int:
    import sys

    from dpo_ds.checkpoint import CheckpointError

    try:
        out = convert_checkpoint(args.checkpoint_dir, args.out_dir, args.dtype, args.max_shard_size, args.adapter_only)
    except (CheckpointError, ExportError) as err:
        print(f"dpo-ds convert: error: {err}", file=sys.stderr)
        return 2
    emit(f"wrote {out}")
    return 0
