"""dpo_ds/layout.py: the names, shapes and values save_pretrained writes, computed group by group from a model in
its in-memory layout (fused MoE experts) without saving it."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dpo_ds.layout import saved_layout, state_tensors, to_saved_layout
from helpers import tiny_causal_lm

MODELS = {"qwen3_moe": {}, "mixtral": {}, "llama": dict(tie_word_embeddings=True)}


def saved_by_transformers(model, directory) -> dict[str, torch.Tensor]:
    model.save_pretrained(directory, safe_serialization=True)
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_saved_layout_is_what_save_pretrained_writes(tmp_path, model_type):
    model = tiny_causal_lm(model_type, **MODELS[model_type])
    on_disk = saved_by_transformers(model, tmp_path)
    groups, shapes = saved_layout(model)
    assert shapes == {name: tuple(t.shape) for name, t in on_disk.items()}
    live = state_tensors(model)
    written, most = {}, 0
    for names in groups:
        converted = to_saved_layout(model, {n: live[n].detach() for n in names})
        assert not set(converted) & set(written), "a saved tensor made by two groups"
        written.update(converted)
        most = max(most, len(converted))
    assert set(written) == set(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(written[name], tensor), name
    if model_type != "llama":  # fused in memory, one tensor per expert on disk
        assert any(n.endswith("experts.gate_up_proj") for n in live)
        assert f"model.layers.1.{'mlp' if model_type == 'qwen3_moe' else 'block_sparse_moe'}.experts.2." \
               f"{'down_proj' if model_type == 'qwen3_moe' else 'w2'}.weight" in on_disk
        assert most == 2 * 3  # the fused gate_up_proj of 3 experts: a gate and an up tensor per expert
    else:  # the tied head is left out, as save_pretrained leaves it out
        assert "lm_head.weight" in live and "lm_head.weight" not in on_disk
