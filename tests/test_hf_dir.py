"""dpo_ds/hf_dir.py and the safetensors writer (dpo_ds/safetensors_io.py): what is written reads back equal,
validation refuses a broken directory, publishing replaces atomically."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dpo_ds.hf_dir import ExportError, publish_dir, validate_hf_dir
from dpo_ds.safetensors_io import SAFE_INDEX, ShardWriter, parse_size


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(6, 8, generator=g).to(torch.bfloat16),        # 96 bytes
            "layer.0.w": torch.randn(5, 3, generator=g),                             # 60 bytes
            "layer.0.norm": torch.randn(7, generator=g).to(torch.float16),           # 14 bytes
            "positions": torch.arange(9, dtype=torch.int64),                         # 72 bytes
            "mask": torch.tensor([[1, 0], [0, 1]], dtype=torch.int32),               # 16 bytes
            "scale": torch.tensor(2.5, dtype=torch.float64)}                         # a 0-d tensor, 8 bytes


def write(directory, tensors, max_shard_bytes=100) -> dict[str, str]:
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.finish()


def read_back(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})
    return out


def test_shard_writer_round_trip(tmp_path):
    tensors = sample_tensors()
    weight_map = write(tmp_path, tensors)
    back = read_back(tmp_path)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # shards of at most 100 bytes, filled in order: 96 | 60+14 | 72+16+8
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([SAFE_INDEX, "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                            "model-00003-of-00003.safetensors"])  # no .data or .tmp left
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    assert index["weight_map"] == weight_map
    assert [weight_map[n][:11] for n in tensors] == ["model-00001", "model-00002", "model-00002", "model-00003",
                                                     "model-00003", "model-00003"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_one_shard_when_everything_fits(tmp_path):
    tensors = sample_tensors()
    write(tmp_path, tensors, max_shard_bytes=parse_size("1MB"))
    assert set(json.loads((tmp_path / SAFE_INDEX).read_text())["weight_map"].values()) == {
        "model-00001-of-00001.safetensors"}
    assert all(torch.equal(read_back(tmp_path)[n], t) for n, t in tensors.items())


def shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def test_validate_accepts_what_was_written(tmp_path):
    tensors = sample_tensors()
    write(tmp_path, tensors)
    validate_hf_dir(tmp_path, shapes(tensors))


@pytest.mark.parametrize("break_it,message", [
    (lambda t, s: s.update({"missing.weight": (2,)}), r"missing tensors \['missing.weight'\]"),
    (lambda t, s: s.pop("mask"), r"unexpected tensors \['mask'\]"),
    (lambda t, s: s.update({"layer.0.w": (3, 5)}), r"layer.0.w has shape \(5, 3\), expected \(3, 5\)"),
    (lambda t, s: t["layer.0.w"].__setitem__((1, 2), float("nan")), "layer.0.w contains NaN or Inf"),
    (lambda t, s: t["embed.weight"].__setitem__((0, 0), float("inf")), "embed.weight contains NaN or Inf"),
    (lambda t, s: (t.update({"empty": torch.zeros(0, 4)}), s.update({"empty": (0, 4)})), r"empty has shape \(0, 4\)"),
], ids=["missing", "unexpected", "shape", "nan", "inf", "empty"])
def test_validate_refuses(tmp_path, break_it, message):
    tensors = sample_tensors()
    expected = shapes(tensors)
    break_it(tensors, expected)
    write(tmp_path, tensors)
    with pytest.raises(ExportError, match=message):
        validate_hf_dir(tmp_path, expected)


def test_validate_refuses_missing_and_corrupt_files(tmp_path):
    tensors = sample_tensors()
    write(tmp_path, tensors)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ExportError, match=f"{shard}: unreadable safetensors file"):
        validate_hf_dir(tmp_path, shapes(tensors))
    shard.unlink()
    with pytest.raises(ExportError, match=f"{shard}: listed in {SAFE_INDEX} but missing"):
        validate_hf_dir(tmp_path, shapes(tensors))
    (tmp_path / SAFE_INDEX).unlink()
    with pytest.raises(ExportError, match="missing"):
        validate_hf_dir(tmp_path, shapes(tensors))


@pytest.mark.parametrize("existing", [True, False])
def test_publish_dir_replaces(tmp_path, existing):
    out, tmp = tmp_path / "final", tmp_path / "final.tmp"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    publish_dir(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and (out / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .tmp, no .old left


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                       ("1.5kb", 1500), (" 10 MiB ", 10 * 2**20), ("64B", 64), ("12345", 12345)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError):
        parse_size("five gigabytes")
