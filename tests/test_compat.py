"""dpo_ds.compat and the checkpoint-layout conversion on every tested transformers: the newer API where the
installed release has it, the older one (transformers 5.17, `make test-floor`) with the same results."""
from __future__ import annotations

import functools
import types
import warnings

import pytest
import torch
import transformers.core_model_loading as core
from safetensors.torch import load_file
from transformers import PreTrainedModel

from dpo_ds.compat import enable_activation_checkpointing
from dpo_ds.layout import _conversions, _split, saved_layout, state_tensors, to_saved_layout


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _gradients(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _checkpointing_funcs(model) -> list:
    return [m._gradient_checkpointing_func for m in model.model.layers if m.gradient_checkpointing]


with_newer_api = pytest.param(lambda model: model, id="activation_checkpointing_enable", marks=pytest.mark.skipif(
    not hasattr(PreTrainedModel, "activation_checkpointing_enable"),
    reason="this transformers has no activation_checkpointing_enable (5.17): the fallback is the path"))
# the older API alone: a view of the model without activation_checkpointing_enable, as transformers 5.17 has it
older_api_only = pytest.param(
    lambda model: types.SimpleNamespace(gradient_checkpointing_enable=model.gradient_checkpointing_enable),
    id="gradient_checkpointing_enable")


@pytest.mark.parametrize("view", [with_newer_api, older_api_only])
def test_activation_checkpointing_is_non_reentrant_and_keeps_the_gradients(view):
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = _llama()
    expected = _gradients(plain, ids)  # no checkpointing: the plain backward
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer transformers: gradient_checkpointing_enable is deprecated
        enable_activation_checkpointing(view(model))
    funcs = _checkpointing_funcs(model)
    assert len(funcs) == 2
    for func in funcs:
        assert isinstance(func, functools.partial) and func.func is torch.utils.checkpoint.checkpoint
        assert func.keywords == {"use_reentrant": False}
    got = _gradients(model, ids)
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_saved_layout_is_what_save_pretrained_writes(tmp_path, family):
    """Fused in-memory experts -> per-expert checkpoint tensors, one group at a time, against the file
    save_pretrained writes (the grouping no longer needs transformers' apply_converters, absent in 5.17)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {"mixtral": dict(num_local_experts=3), "qwen3_moe": dict(num_experts=3, moe_intermediate_size=24)}
    config = AutoConfig.for_model(family, vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2, **shapes[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    written = load_file(str(tmp_path / "model.safetensors"))
    groups, shapes_out = saved_layout(model)
    assert shapes_out == {name: tuple(t.shape) for name, t in written.items()}
    live = state_tensors(model)
    got = {}
    for names in groups:
        got.update(to_saved_layout(model, {name: live[name].detach() for name in names}))
    assert sorted(got) == sorted(written)
    assert [name for name in written if not torch.equal(got[name], written[name])] == []
    fused = [names for names in groups if any(".experts." in n for n in names)]
    assert fused and all(len(names) == 1 for names in fused)  # gate_up_proj / down_proj: one parameter each
    if hasattr(core, "apply_converters"):  # the newer transformers' own grouping gives the same groups
        _, converters = _split([c.reverse_transform() for c in _conversions(model, saving=True)[::-1]])
        by_library: dict[str, list[str]] = {}
        for names in groups:
            for name in names:
                renamed, pattern = core.apply_converters(name, converters)
                by_library.setdefault(renamed if pattern is not None else name, []).append(name)
        assert list(by_library.values()) == groups
