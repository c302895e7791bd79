"""padding_free's attention: a packed row scored through sdpa_packed (one sdpa call per sequence) gives each
sequence's logits and parameter gradients as that sequence forwarded alone, for the families whose attention is
sdpa; the switch happens only where no mask of the model's own would be lost; padding_free auto's choice."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_ds import packed_attention
from dpo_ds.config import TrainConfig
from dpo_ds.engines import resolve_padding_free

VOCAB = 1000
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, vocab_size=VOCAB)
SHAPES = {"llama": SMALL, "qwen2": SMALL, "gemma3_text": {**SMALL, "head_dim": 8},
          "mixtral": {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
          "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB)}
LENGTHS = [5, 9, 1, 3]  # a one-token sequence attends only to itself


def run_settings(**fields) -> SimpleNamespace:
    return SimpleNamespace(**{**dict(padding_free=True, attn_implementation="auto", sequence_parallel_size=1,
                                     max_length=64), **fields})


def tiny_model(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SHAPES.get(model_type, SMALL), **overrides})
    return AutoModelForCausalLM.from_config(config).float().eval()  # eval: GPT-2's dropout off


def logits_and_grads(model, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits `forward(model)` returns ([tokens, vocab]) and every parameter's gradient of a fixed random
    weighting of them."""
    model.zero_grad()
    logits = forward(model)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bounds", ["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("model_type", list(SHAPES))
def test_a_packed_row_gives_each_sequence_what_it_gets_alone(model_type, bounds):
    model = tiny_model(model_type)
    seqs = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    want, want_grads = logits_and_grads(model, lambda m: torch.cat(
        [m(input_ids=s[None], use_cache=False).logits[0] for s in seqs]))

    assert model.config._attn_implementation == "sdpa" and packed_attention.adopt(model, run_settings())
    assert model.config._attn_implementation == packed_attention.KERNEL
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu} if bounds == "cu_seq_lens" else {}
    got, got_grads = logits_and_grads(model, lambda m: m(input_ids=ids, position_ids=positions, use_cache=False,
                                                         **extra).logits[0])
    assert (got - want).abs().max() < 1e-5
    assert got_grads.keys() == want_grads.keys()
    for name, want_grad in want_grads.items():  # float rounding of sums over other groupings: relative to its size
        assert (got_grads[name] - want_grad).abs().max() <= 1e-5 * want_grad.abs().max(), name


def test_a_row_of_one_sequence_is_plain_causal_attention():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        packed_attention.adopt(model, run_settings())
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5


def test_adopted_only_where_the_models_own_attention_is_kept(caplog):
    window = tiny_model("mistral", sliding_window=8)
    with caplog.at_level(logging.WARNING, logger="dpo_ds.packed_attention"):
        assert not packed_attention.adopt(window, run_settings(max_length=64))
    assert "block-diagonal mask" in caplog.text and "sliding window (8 tokens < max_length 64) would be dropped" \
        in caplog.text
    assert window.config._attn_implementation == "sdpa"
    assert packed_attention.adopt(window, run_settings(max_length=8))  # no sequence is longer than the window
    assert not packed_attention.adopt(tiny_model("llama"), run_settings(padding_free=False))
    assert not packed_attention.adopt(tiny_model("llama"), run_settings(sequence_parallel_size=2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpo_ds.packed_attention"):
        assert not packed_attention.adopt(tiny_model("llama"), run_settings(attn_implementation="sdpa"))  # asked for
        # Gemma-2 soft-caps its attention scores: eager in transformers 5.24, sdpa (without the cap) in 5.17
        assert not packed_attention.adopt(tiny_model("gemma2", head_dim=8), run_settings())
    assert "(attn_implementation sdpa was asked for)" in caplog.text
    assert "Gemma2ForCausalLM attends each packed row through transformers' block-diagonal mask" in caplog.text


def saved_config(tmp_path, model_type: str, **overrides) -> str:
    path = tmp_path / model_type
    AutoConfig.for_model(model_type, **{**SHAPES.get(model_type, SMALL), **overrides}).save_pretrained(path)
    return str(path)


def test_padding_free_auto_packs_where_each_sequence_is_attended_alone(tmp_path, caplog):
    def resolved(model_type, **fields):
        cfg = TrainConfig(model_name_or_path=saved_config(tmp_path, model_type, **fields.pop("model", {})),
                          train_file="unused", max_length=64, **fields)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dpo_ds.engines.models"):
            resolve_padding_free(cfg)
        return cfg.padding_free, caplog.text

    assert TrainConfig().padding_free == "auto"
    on, why = resolved("llama")
    assert on is True and "padding_free on (padding_free auto: sdpa attends each packed sequence alone" in why
    on, why = resolved("gemma2", model={"head_dim": 8})  # eager (transformers 5.24), or sdpa without the cap
    assert on is False and ("a packed row would go through a block-diagonal mask, quadratic in its total tokens "
                            "(its attention is eager)" in why
                            or "(its attention logit soft-capping (50.0) would be dropped)" in why)
    on, why = resolved("mistral", model={"sliding_window": 8})
    assert on is False and "sliding window (8 tokens < max_length 64) would be dropped" in why
    on, why = resolved("gpt_neox")  # sdpa, but not a family dpo-ds tests packed rows with
    assert on is False and "model type gpt_neox is not among the families" in why
    assert resolved("mistral", model={"sliding_window": 64})[0] is True
    on, why = resolved("llama", sequence_parallel_size=2)
    assert on is False and "sequence_parallel_size 2 keeps padded rows" in why
    on, why = resolved("llama", attn_implementation="sdpa")
    assert on is False and "(attn_implementation sdpa was asked for)" in why
    assert resolved("llama", attn_implementation="flash_attention_2")[0] is True
    for setting, want in (("true", True), ("false", False), (True, True), (False, False)):
        on, why = resolved("gemma2", padding_free=setting, model={"head_dim": 8})
        assert on is want and why == ""  # as set: nothing to decide, nothing logged
