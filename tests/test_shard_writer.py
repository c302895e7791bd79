"""dpo_ds.safetensors_io.ShardWriter: shards put together only at finish (issue 20, finding 4), read back by safetensors."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from dpo_ds.safetensors_io import SAFE_INDEX, ShardWriter


def test_shards_are_assembled_at_finish_and_load_with_safetensors(tmp_path):
    tensors = {f"layer.{i}.weight": torch.arange(i * 10, i * 10 + 6, dtype=torch.float32).view(2, 3) for i in range(5)}
    tensors["ids"] = torch.tensor([7, 8, 9], dtype=torch.int64)
    writer = ShardWriter(tmp_path, max_shard_bytes=50)  # two 24-byte tensors per shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    # during the adds (the export's gathering loop) only raw data files are written: no header, no copy
    assert list(tmp_path.glob("*.safetensors")) == [] and len(writer.shards) == 2
    weight_map = writer.finish()
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*shards, SAFE_INDEX])  # no data file left
    loaded = {}
    for shard in shards:
        loaded.update(load_file(str(tmp_path / shard)))
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 5 * 24 + 24
