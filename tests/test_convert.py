"""dpo_ds/convert.py: export_engine of a plain (non-ZeRO) model in one process writes what save_pretrained writes,
and transformers loads it back."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_ds.checkpoint import HF_METADATA
from dpo_ds.convert import export_engine, is_lora_checkpoint
from dpo_ds.lora import ADAPTER_CONFIG
from helpers import FakeEngine, tiny_causal_lm


def tensors_in(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("model_type,extra", [("llama", dict(tie_word_embeddings=True)), ("mixtral", {})])
def test_export_engine_writes_what_save_pretrained_writes(tmp_path, model_type, extra):
    model = tiny_causal_lm(model_type, **extra)
    model.save_pretrained(tmp_path / "reference")
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    export_engine(FakeEngine(model), str(out), max_shard_size="4KB")
    written, expected = tensors_in(out), tensors_in(tmp_path / "reference")
    assert set(written) == set(expected)
    assert all(torch.equal(written[name], tensor) for name, tensor in expected.items())
    assert len(list(out.glob("model-*.safetensors"))) > 1  # 4 KB shards
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["final", "reference"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    wanted = model.state_dict()
    assert loaded.state_dict().keys() == wanted.keys()
    assert all(torch.equal(got, wanted[name]) for name, got in loaded.state_dict().items())


def test_export_engine_casts_and_restores_config_overrides(tmp_path):
    model = tiny_causal_lm("llama")
    model.config.attention_dropout = 0.0  # as engines.disable_dropout leaves it
    export_engine(FakeEngine(model), str(tmp_path / "final"), dtype=torch.bfloat16,
                  config_overrides=[("", "attention_dropout", 0.3)])
    written = tensors_in(tmp_path / "final")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert torch.equal(written["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach().bfloat16())
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["attention_dropout"] == 0.3 and config["dtype"] == "bfloat16"
    assert model.config.attention_dropout == 0.0  # the live model keeps the run's value


def test_is_lora_checkpoint(tmp_path):
    (tmp_path / HF_METADATA).mkdir()
    assert not is_lora_checkpoint(tmp_path)
    (tmp_path / HF_METADATA / ADAPTER_CONFIG).write_text("{}")
    assert is_lora_checkpoint(tmp_path)
