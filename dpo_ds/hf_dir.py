"""Hugging Face model directories as dpo-ds writes them: streamed safetensors shards plus their index, the
config / generation config / tokenizer files, a validation pass over what was written, and the atomic rename
that publishes the directory only once it is valid. Used by the export (dpo_ds.convert), checkpoint metadata
(dpo_ds.checkpoint) and LoRA adapter directories (dpo_ds.lora)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from dpo_ds.errors import UsageError, describe_error
from dpo_ds.safetensors_io import SAFE_INDEX
from launcher.dist import on_rank0



class ExportError(UsageError, RuntimeError):
    pass


def write_on_rank0(what: str, work, tmp: Path) -> None:
    """Rank 0 runs `work` (which writes `tmp` and publishes it) while the other ranks wait; if it fails, `tmp`
    goes and every rank raises the same ExportError, naming the file (a collective: every rank calls it)."""
    def attempt() -> str | None:
        try:
            work()
        except (OSError, ExportError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            return f"{describe_error(err)} (while {what}; nothing was published)"
        return None

    failure = on_rank0(what, attempt)
    if failure is not None:
        raise ExportError(failure)


def validate_hf_dir(out_dir: Path, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present once, with its shape, non-empty and finite; every shard listed exists."""
    index_path = out_dir / SAFE_INDEX
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
            raise ExportError(f"{path}: listed in {SAFE_INDEX} but missing")
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


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the validated tmp dir; the old one is removed only after the new one is in place."""
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# A config value the run changed: (sub-config attribute, or "" for the config itself; field name; the config's value)
ConfigOverride = tuple[str, str, float]


def saved_config(model, overrides: Sequence[ConfigOverride] = ()):
    """The model's config as the user gave it: the run's `overrides` (engines.disable_dropout) and QLoRA's
    quantization undone."""
    config = copy.deepcopy(model.config)
    # QLoRA: the run's nf4 quantization of the frozen base is no property of the model written
    for name in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(name, None)
    for sub_config, name, value in overrides:
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
    from transformers import AutoModelForCausalLM  # heavy: only the export paths need it

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
