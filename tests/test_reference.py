"""dpo_ds/reference.py: the reference sources' log-probs, the precomputed table on disk and its cache key."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dpo_ds.config import TrainConfig
from dpo_ds.data import MicroBatch, TokenizedPairs, collate
from dpo_ds.parallel import Parallel
from dpo_ds.reference import CachedReference, NoReference, _cache_key, _load_table, _precompute


def make_pairs(n: int, fingerprint: str = "fp-a") -> TokenizedPairs:
    return TokenizedPairs(fingerprint=fingerprint, prompt=[[1, 2 + i] for i in range(n)],
                          chosen=[[3] * (1 + i % 3) for i in range(n)], rejected=[[4] * (2 + i % 2) for i in range(n)],
                          pair_ids=[str(i) for i in range(n)])


@pytest.mark.parametrize("indices", [[0], [4, 1, 2]])
def test_no_reference_gives_one_zero_per_sequence(indices):
    logps = NoReference().logps(MicroBatch.of(make_pairs(5), indices, 0, packed=False))
    assert torch.equal(logps, torch.zeros(2 * len(indices)))


def test_cached_reference_follows_collates_order():
    a, b = make_pairs(5, "fp-a"), make_pairs(5, "fp-b")
    table_a = torch.tensor([[10.0 * i + 1, 10.0 * i + 2] for i in range(5)])  # (chosen, rejected) of pair i
    source = CachedReference({"fp-a": table_a, "fp-b": -table_a})
    indices = [3, 0, 4]
    micro = MicroBatch.of(a, indices, 0, packed=False)
    expected = torch.tensor([31.0, 1.0, 41.0, 32.0, 2.0, 42.0])  # chosen of each pair, then rejected of each
    assert torch.equal(source.logps(micro), expected)
    assert torch.equal(source.logps(MicroBatch.of(b, indices, 0, packed=False)), -expected)
    # the same slots as collate's rows: prompt+chosen of each pair, then prompt+rejected
    rows = collate(a, indices, pad_id=0)["input_ids"]
    assert rows[:3, 2].tolist() == [3, 3, 3] and rows[3:, 2].tolist() == [4, 4, 4]


def write_shard(directory, rank: int, world: int, rows: list[int], logps: list[list[float]]) -> None:
    save_file({"rows": torch.tensor(rows, dtype=torch.int64), "logps": torch.tensor(logps, dtype=torch.float32)},
              str(directory / f"rank-{rank:05d}-of-{world:05d}.safetensors"))


def test_load_table_from_two_ranks(tmp_path):
    (tmp_path / "complete.json").write_text(json.dumps({"examples": 5, "sequences": 2, "ranks": 2}))
    write_shard(tmp_path, 0, 2, [0, 1, 4], [[-1, -2], [-3, -4], [-9, -10]])
    write_shard(tmp_path, 1, 2, [2, 3], [[-5, -6], [-7, -8]])
    assert torch.equal(_load_table(tmp_path), -torch.arange(1.0, 11.0).reshape(5, 2))


def test_load_table_refuses_missing_rows(tmp_path):
    (tmp_path / "complete.json").write_text(json.dumps({"examples": 5, "sequences": 2, "ranks": 2}))
    write_shard(tmp_path, 0, 2, [0, 1, 4], [[-1, -2], [-3, -4], [-9, -10]])
    with pytest.raises(RuntimeError, match=f"{tmp_path}: reference log-probs missing"):
        _load_table(tmp_path)


class IndexSource:
    """A reference whose log-probs name the pair and slot they belong to: chosen of pair i = -i, rejected = -100 - i."""

    def logps(self, micro: MicroBatch) -> torch.Tensor:
        idx = torch.tensor(list(micro.indices), dtype=torch.float32)
        return torch.cat([-idx, -100 - idx])


def test_precompute_then_load_single_process(tmp_path):
    pairs = make_pairs(5)
    target = tmp_path / "ref-x"
    _precompute(IndexSource(), TrainConfig(micro_batch_size=2), pairs, target, 0, Parallel())
    assert sorted(p.name for p in target.iterdir()) == ["complete.json", "rank-00000-of-00001.safetensors"]
    assert not (tmp_path / "ref-x.tmp").exists()
    expected = torch.tensor([[-float(i), -100.0 - i] for i in range(5)])
    assert torch.equal(_load_table(target), expected)
    assert torch.equal(CachedReference({"fp-a": _load_table(target)}).logps(MicroBatch.of(pairs, [2, 4], 0, False)),
                       torch.tensor([-2.0, -4.0, -102.0, -104.0]))


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    return str(tmp_path / "model")


def adapter(tmp_path, name: str, weights: bytes) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text('{"r": 4}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return str(path)


def test_cache_key_changes_with_what_the_log_probs_depend_on(tmp_path, model_dir):
    base = dict(model_name_or_path=model_dir, precision="fp32")
    pairs = make_pairs(2, "fp-a")

    def key(fingerprint="fp-a", **fields):
        return _cache_key(TrainConfig(**{**base, **fields}), make_pairs(2, fingerprint))

    assert key() == _cache_key(TrainConfig(**base), pairs)  # deterministic
    variants = [key(precision="bf16"), key(fingerprint="fp-b"), key(lora_quantize="nf4"),
                key(lora_adapter=adapter(tmp_path, "ad1", b"one")), key(lora_adapter=adapter(tmp_path, "ad2", b"two"))]
    assert len({key(), *variants}) == 1 + len(variants)
    # the reference model's files count, and its own path wins over the policy's
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "mistral"}')
    before = key()
    assert key(ref_model_name_or_path=str(other)) not in {before, *variants}
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    assert key() != before
