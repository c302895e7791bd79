"""The safetensors codec of dpo-ds: reading tensors from a Hugging Face checkpoint without mapping whole files
(headers first, then byte ranges of single tensors, straight into the memory they belong in), and writing sharded
checkpoints one tensor at a time (`ShardWriter`). Both sides use the format's own layout: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, the tensors' bytes."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from dpo_ds.errors import UsageError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
STAGING_BYTES = 16 * 2**20  # largest read buffer when a tensor cannot be read in place


# ----------------------------------------------------------------------------------------------- reading
class LoadError(UsageError, RuntimeError):
    pass


def has_safetensors(path: str | Path) -> bool:
    root = Path(path)
    return (root / SAFE_INDEX).is_file() or (root / SAFE_SINGLE).is_file()


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Checkpoint key -> the .safetensors file holding it (model.safetensors or the sharded index)."""
    root = Path(path)
    if (root / SAFE_INDEX).is_file():
        weight_map = json.loads((root / SAFE_INDEX).read_text())["weight_map"]
        return {key: root / name for key, name in weight_map.items()}
    if (root / SAFE_SINGLE).is_file():
        return {key: root / SAFE_SINGLE for key in read_header(root / SAFE_SINGLE)}
    present = sorted(p.name for p in root.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise LoadError(f"{root}: no {SAFE_SINGLE} or {SAFE_INDEX} (found {present or 'no weight files'}); "
                    f"the streamed loader reads safetensors only")


class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file (from its header)."""

    def __init__(self, file: Path, key: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.file, self.key, self.dtype, self.shape, self.begin, self.end = file, key, dtype, shape, begin, end

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise LoadError(f"{self.file}: {self.key} has dtype {self.dtype}, which this loader does not read")
        return SAFETENSORS_DTYPES[self.dtype]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """A safetensors header: u64 little-endian length, then JSON {key: {dtype, shape, data_offsets}}."""
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        size = file.stat().st_size
    except (OSError, struct.error, ValueError) as err:
        raise LoadError(f"{file}: unreadable safetensors header ({err})") from None
    data_start = 8 + length
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = (data_start + int(x) for x in info["data_offsets"])
        if end > size:
            raise LoadError(f"{file}: {key} ends at byte {end} but the file has {size} (truncated?)")
        out[key] = TensorEntry(file, key, info["dtype"], tuple(info["shape"]), begin, end)
    return out


def read_headers(files: dict[str, Path]) -> dict[str, TensorEntry]:
    """Checkpoint key -> TensorEntry for every key of `files` (headers only, no tensor data read)."""
    out: dict[str, TensorEntry] = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise LoadError(f"{file}: listed in {SAFE_INDEX} but missing")
        header = read_header(file)
        for key, target_file in files.items():
            if target_file == file:
                if key not in header:
                    raise LoadError(f"{file}: {SAFE_INDEX} maps {key} to this file but it does not hold it")
                out[key] = header[key]
    return out


def _readinto(fh, buf: torch.Tensor, offset: int, entry: TensorEntry) -> None:
    view = memoryview(buf.numpy()).cast("B")
    fh.seek(offset)
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise LoadError(f"{entry.file}: unexpected end of file reading {entry.key}")
        got += n


def read_into(entry: TensorEntry, target: torch.Tensor) -> None:
    """Copy the tensor `entry` into `target` (same number of elements): straight into target's memory when
    it is a contiguous CPU tensor of the file's dtype, else through a bounded staging buffer."""
    if not isinstance(entry, TensorEntry):  # a layout.ConvertedTensor
        target.copy_(entry.full().view(target.shape))
        return
    dtype = entry.torch_dtype
    nbytes = entry.end - entry.begin
    numel = target.numel()
    if numel * torch.empty((), dtype=dtype).element_size() != nbytes:
        raise LoadError(f"{entry.file}: {entry.key} holds {nbytes} bytes, not {numel} x {dtype}")
    flat = target.view(-1) if target.is_contiguous() else None
    with open(entry.file, "rb", buffering=0) as fh:
        if flat is not None and flat.device.type == "cpu" and flat.dtype == dtype and numel:
            _readinto(fh, flat.view(torch.uint8), entry.begin, entry)
            return
        item = nbytes // max(numel, 1)
        step = max(1, STAGING_BYTES // max(item, 1))
        staging = torch.empty(min(step, numel), dtype=dtype)
        dest = flat if flat is not None else torch.empty(numel, dtype=target.dtype, device=target.device)
        for start in range(0, numel, step):
            n = min(step, numel - start)
            chunk = staging[:n]
            _readinto(fh, chunk.view(torch.uint8), entry.begin + start * item, entry)
            dest[start:start + n].copy_(chunk)
        if flat is None:
            target.copy_(dest.view(target.shape))


def read_range(entry: TensorEntry, start: int, out: torch.Tensor) -> None:
    """Flat elements [start, start + out.numel()) of `entry` into the contiguous CPU tensor `out` (file dtype)."""
    if not isinstance(entry, TensorEntry):  # a layout.ConvertedTensor
        entry.read_flat(start, out.view(-1))
        return
    dtype = entry.torch_dtype
    item = torch.empty((), dtype=dtype).element_size()
    if out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("read_range needs a contiguous CPU tensor of the file's dtype")
    if entry.begin + (start + out.numel()) * item > entry.end:
        raise LoadError(f"{entry.file}: {entry.key}: elements [{start}, {start + out.numel()}) out of range")
    if out.numel():
        with open(entry.file, "rb", buffering=0) as fh:
            _readinto(fh, out.view(-1).view(torch.uint8), entry.begin + start * item, entry)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.torch_dtype)
    read_into(entry, out)
    return out


# ----------------------------------------------------------------------------------------------- writing
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
        (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return weight_map
