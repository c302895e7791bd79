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

from dpo_ds.loading import SAFETENSORS_DTYPES
from launcher.dist import on_rank0

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class AgreedError(RuntimeError):
    """A failure every rank raises alike (`same_on_every_rank`: the ranks agreed on it, so rank 0 alone
    reports it) or that one rank found (the default)."""

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


class ExportError(AgreedError):
    pass


def describe_error(err: BaseException) -> str:
    """'<path>: <reason>' for a file system error (as `dpo-ds train: error: <path>: No space left on
    device`), the error's own text otherwise."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


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
        raise ExportError(failure, same_on_every_rank=True)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


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
        self.entries[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
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
