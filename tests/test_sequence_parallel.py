"""Sequence parallelism (dpo_ds.sequence_parallel): the settings check, sharding a collated micro-batch, and a
2-rank Ulysses run against the same model at S=1 (tests/dist_sequence_parallel_probe.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from dpo_ds.config import ConfigError
from dpo_ds.data import TokenizedPairs, collate
from dpo_ds.logprobs import score_hidden, score_logits
from dpo_ds.sequence_parallel import check_settings, shard_batch
from helpers import launch


def llama(**fields):
    return AutoConfig.for_model("llama", **{"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4,
                                            **fields})


def refused(size, world=8, config=None, kernel="sdpa", max_length=1024) -> str:
    with pytest.raises(ConfigError) as err:
        check_settings(size, world, config or llama(), kernel, max_length)
    assert err.value.field_name == "sequence_parallel_size"
    assert str(err.value).startswith("field 'sequence_parallel_size': ")
    return str(err.value)


def test_settings_that_shard():
    check_settings(1, 3, AutoConfig.for_model("gpt2"), "eager", 1024)  # S=1: nothing to check
    check_settings(2, 8, llama(), "sdpa", 1024)
    check_settings(8, 8, llama(), None, 1024)  # 4 key/value heads replicated over 8 ranks; None: the default, sdpa
    check_settings(4, 8, llama(), "flash_attention_2", 1024)
    # a sliding window the sequences never exceed, or one flash attention takes as an argument
    check_settings(2, 2, AutoConfig.for_model("gemma2", sliding_window=512), "sdpa", 512)
    check_settings(2, 2, AutoConfig.for_model("mistral", sliding_window=512), "flash_attention_2", 4096)
    check_settings(2, 2, AutoConfig.for_model("mixtral"), "sdpa", 1024)  # head_dim None: hidden / heads


def test_settings_refused_with_the_field_named():
    assert "3 does not divide the world size 8" in refused(3)
    assert "at least 1" in refused(0)
    assert "does not divide the model's 8 attention heads" in refused(
        3, world=3, config=llama(num_key_value_heads=8))
    assert "key/value heads" in refused(2, config=llama(num_key_value_heads=3, num_attention_heads=6, hidden_size=48))
    assert "key/value heads" in refused(8, config=llama(num_attention_heads=24, num_key_value_heads=6, hidden_size=96))
    assert "eager" in refused(2, kernel="eager")
    assert "flex_attention" in refused(2, kernel="flex_attention")
    assert "num_key_value_heads" in refused(2, config=AutoConfig.for_model("gpt2"))
    assert "window 512 < max_length 1024" in refused(2, config=AutoConfig.for_model("mistral", sliding_window=512))
    assert "window 4096 < max_length 8192" in refused(2, config=AutoConfig.for_model("gemma3_text"), max_length=8192)
    linear = SimpleNamespace(model_type="hybrid", num_attention_heads=8, num_key_value_heads=8, hidden_size=64,
                             layer_types=["linear_attention", "full_attention"])
    linear.get_text_config = lambda: linear
    assert "linear_attention layers" in refused(2, config=linear)
    mla = SimpleNamespace(model_type="mla", num_attention_heads=8, num_key_value_heads=8, hidden_size=64, head_dim=8,
                          v_head_dim=16)
    mla.get_text_config = lambda: mla
    assert "one head size" in refused(2, config=mla)


def test_zero3_without_reduce_scatter_is_refused_under_s():
    from dpo_ds.sequence_parallel import check_deepspeed_config

    scattering = {"zero_optimization": {"stage": 3}}
    check_deepspeed_config(scattering, 2, "zero3.json")
    check_deepspeed_config({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 1, "zero3.json")
    with pytest.raises(ConfigError, match="reduce_scatter true in my.json") as err:
        check_deepspeed_config({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 2, "my.json")
    assert err.value.field_name == "sequence_parallel_size"


# --------------------------------------------------------------------------- sharding
def pairs(lengths: list[tuple[int, int, int]], vocab: int = 50) -> TokenizedPairs:
    g = torch.Generator().manual_seed(len(lengths))
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return TokenizedPairs(prompt=[ids(p) for p, _, _ in lengths], chosen=[ids(c) for _, c, _ in lengths],
                          rejected=[ids(r) for _, _, r in lengths])


def plain_sums(logits: torch.Tensor, data: TokenizedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (chosen of every pair, then rejected), the textbook sum of log softmax(logits[j-1])[id_j]
    over completion tokens j, sequence by sequence; `logits` [2B, L, V] one row per sequence."""
    sums, counts = [], []
    for completions in (data.chosen, data.rejected):
        for i in range(len(data)):
            seq = list(data.prompt[i]) + list(completions[i])
            row = len(sums)
            total = sum(torch.log_softmax(logits[row, j - 1], -1)[seq[j]] for j in range(len(data.prompt[i]), len(seq)))
            sums.append(total)
            counts.append(len(completions[i]))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_shards_score_what_the_whole_batch_scores(size, packed):
    data = pairs([(4, 7, 2), (3, 1, 6), (5, 4, 4)])  # 11, 4, 9 / 8, 9, 9 tokens: 51 packed, none a multiple of 3
    batch = collate(data, [0, 1, 2], pad_id=0, packed=packed)
    rows, length = batch["input_ids"].shape
    width = -(-length // size) * size
    vocab, hidden_size = 50, 6
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, width, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)
    logits = hidden @ weight.T
    shards = [shard_batch(batch, size, r, pad_id=0) for r in range(size)]
    # every shard T / S wide, together the batch padded with pad_id
    assert {s.input_ids.shape for s in shards} == {(rows, width // size)}
    whole_ids = torch.cat([s.input_ids for s in shards], dim=1)
    assert torch.equal(whole_ids[:, :length], batch["input_ids"]) and (whole_ids[:, length:] == 0).all()
    positions = torch.cat([s.position_ids for s in shards], dim=1)
    if packed:  # restarting per sequence; the padding is a sequence of its own
        expected = torch.cat([batch["position_ids"], torch.arange(width - length)[None]], dim=1)
    else:
        expected = torch.arange(width).expand(rows, width)
    assert torch.equal(positions, expected)

    from_logits = [score_logits(logits[:, r * width // size:(r + 1) * width // size], s.scoring, chunk_size=2)
                   for r, s in enumerate(shards)]
    from_head = [score_hidden(hidden[:, r * width // size:(r + 1) * width // size], weight, s.scoring, chunk_size=2)
                 for r, s in enumerate(shards)]
    if packed:  # one row per sequence for the textbook sums
        starts = (batch["position_ids"][0] == 0).nonzero().squeeze(-1).tolist() + [length]
        per_sequence = torch.zeros(len(starts) - 1, max(b - a for a, b in zip(starts, starts[1:])), vocab,
                                   dtype=torch.float64)
        for k, (a, b) in enumerate(zip(starts, starts[1:])):
            per_sequence[k, :b - a] = logits[0, a:b]
    else:
        per_sequence = logits
    want_sums, want_counts = plain_sums(per_sequence, data)
    for parts in (from_logits, from_head):
        torch.testing.assert_close(sum(p[0] for p in parts), want_sums, rtol=1e-12, atol=1e-12)
        assert torch.equal(sum(p[1] for p in parts), want_counts)


def test_a_shard_scores_the_first_token_of_the_next_shard():
    # one packed row: [p p c c] [p c c c]; cut after 4 tokens, the 4th position predicts the 5th token (a
    # prompt token: not scored), and in the padded layout row 0 = p p c c | c c: position 3 predicts token 4
    data = TokenizedPairs(prompt=[[11, 12]], chosen=[[13, 14, 15, 16]], rejected=[[17, 18]])
    padded = collate(data, [0], pad_id=0)
    first, second = (shard_batch(padded, 2, r, pad_id=0) for r in (0, 1))
    assert first.input_ids.tolist() == [[11, 12, 13], [11, 12, 17]]
    assert first.scoring.targets.tolist() == [[12, 13, 14], [12, 17, 18]]
    assert first.scoring.mask.tolist() == [[False, True, True], [False, True, True]]
    assert second.scoring.targets[0].tolist() == [15, 16, 0] and second.scoring.mask[0].tolist() == [True, True, False]
    packed = collate(data, [0], pad_id=0, packed=True)  # 11 12 13 14 15 16 | 11 12 17 18: 10 tokens
    first, second = (shard_batch(packed, 2, r, pad_id=0) for r in (0, 1))
    assert first.scoring.targets.tolist() == [[12, 13, 14, 15, 16]]
    assert first.scoring.mask.tolist() == [[False, True, True, True, True]]
    assert first.scoring.segments.tolist() == [[0, 0, 0, 0, 0]]
    assert second.input_ids.tolist() == [[16, 11, 12, 17, 18]]
    assert second.scoring.mask.tolist() == [[False, False, True, True, False]]  # 16 -> 11 starts sequence 1
    assert second.scoring.segments.tolist() == [[1, 1, 1, 1, 1]]
    assert second.position_ids.tolist() == [[5, 0, 1, 2, 3]]


# --------------------------------------------------------------------------- S=2 against S=1, on 2 and 4 ranks
@pytest.fixture(scope="module", params=[(2, "llama"), (4, "llama"), (2, "mixtral")],
                ids=["2_ranks", "2_data_parallel_x_2_ranks", "2_ranks_moe_tied_embeddings"])
def probe(request, tmp_path_factory):
    """One launch per world size and family: per rank, how far S=2 is from S=1
    (tests/dist_sequence_parallel_probe.py)."""
    world, family = request.param
    out = tmp_path_factory.mktemp("sp") / "probe.json"
    launch(["tests/dist_sequence_parallel_probe.py", str(out), family], nproc=world, timeout=900)
    reports = json.loads(out.read_text())
    assert [(r["world_size"], r["family"]) for r in reports] == [(world, family)] * world
    return reports


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("setting", ["plain", "plain_fused_head", "zero3", "zero3_tiled_mlp_checkpointing"])
def test_sequence_parallel_matches_one_rank(probe, layout, setting):
    """Per-sequence log-prob sums and the DPO loss of each rank's micro-batch within 1e-6 of S=1, and the step's
    parameter gradients (ZeRO-3's, or the mean over ranks that it takes) within 1e-5, relative."""
    for rank, report in enumerate(probe):
        case = report[f"{setting}/{layout}"]
        assert case["tokens_equal"], rank
        assert case["logps_rel_diff"] < 1e-6, (rank, case)
        assert case["loss_rel_diff"] < 1e-6, (rank, case)
        assert case["grad_rel_diff"] < 1e-5, (rank, case)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_frozen_reference_engine_scores_what_one_rank_scores(probe, layout):
    for rank, report in enumerate(probe):
        case = report[f"zero3_reference/{layout}"]
        assert case["tokens_equal"] and case["logps_rel_diff"] < 1e-6, (rank, case)


@pytest.mark.distributed
def test_zero3_counts_data_parallel_groups_in_the_batch(probe):
    assert {r["zero3_train_batch_size"] for r in probe} == {len(probe) // 2}  # micro 1 x accumulation 1 x world / S


@pytest.mark.distributed
def test_an_identity_backward_would_give_one_s_th_of_the_gradient(probe):
    """Why sum_over_group's backward is an all-reduce: ZeRO-3 averages over all S x DP ranks, so with an
    identity backward every parameter's gradient is 1/S of the S=1 one."""
    for report in probe:
        ratios = report["identity_backward_grad_ratio"]
        assert ratios == pytest.approx([0.5] * len(ratios), rel=1e-5)


# --------------------------------------------------------------------------- tiled MLP
def test_tiled_mlp_computes_what_the_model_computes():
    from transformers import AutoModelForCausalLM

    from dpo_ds.sequence_parallel import enable_tiled_mlp

    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64))
    plain, tiled = models
    assert enable_tiled_mlp(tiled) == 2
    tiles = []  # positions each down_proj call sees: 50 tokens in ceil(50 / 16) = 4 tiles
    tiled.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: tiles.append(args[0].shape[-2]))
    ids = torch.randint(0, 50, (2, 50), generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (plain, tiled):
        logits = model(input_ids=ids, use_cache=False).logits
        (logits.sin().sum()).backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    # the forward's tiles of each row's 50 positions, then the backward's recomputation over the 2 x 50 flattened
    assert tiles == [13, 13, 13, 11] + [25] * 4
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-12, atol=1e-12)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-10, atol=1e-12)
