"""The efficiency features compute the same DPO: padding-free packing, token-budget micro-batches (equal
weight per pair however many pairs a micro-batch holds) and precomputed reference log-probs, each checked
against the plain single-process PyTorch DPO of tests/helpers.py."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds.config import load_config
from dpo_ds.data import PairSampler, collate, load_pairs
from dpo_ds.logprobs import sequence_logps
from helpers import launch_probe_runs, plain_dpo, read_metrics, write_config

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, shuffle=False,
                learning_rate=2e-3, warmup_steps=1, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=0.5,
                beta=0.1, logging_steps=1, seed=0)
WORLD = 2


# Every 2-rank run of this file, trained one after the other in one launch (tests/dist_train_probe.py --runs):
# name -> config fields over SETTINGS. "cached_again" reuses the cache "cached" wrote, so it must come after it.
RUNS = {"logits": dict(fused_lm_head=False),
        "tied": {},  # model_name_or_path: the tied-embeddings copy the fixture builds
        "padded": dict(padding_free=False),
        "packed_auto": {},  # padding_free and attn_implementation auto: packed rows, sdpa per sequence
        "packed_sdpa": dict(padding_free=True, attn_implementation="sdpa"),  # through a block-diagonal mask
        "packed_eager": dict(padding_free=True, attn_implementation="eager"),
        "budget": dict(max_tokens_per_micro_batch=160),  # a few demo pairs per micro-batch: sizes differ
        "cached": dict(precompute_ref=True),
        "cached_again": dict(precompute_ref=True)}


class Run(NamedTuple):
    out: Path  # output_dir
    config: Path
    probe: dict  # the probe's report
    stderr: str  # the ranks' stderr during this run only


@pytest.fixture(scope="module")
def tied_model(demo_assets, tmp_path_factory):
    """The demo model with lm_head sharing the input embedding's parameter, saved as an HF dir."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(demo_assets.model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    tied = tmp_path_factory.mktemp("tied_model")
    model.save_pretrained(tied)
    AutoTokenizer.from_pretrained(demo_assets.model_dir).save_pretrained(tied)
    return model, str(tied)


@pytest.fixture(scope="module")
def runs(demo_assets, tied_model, tmp_path_factory) -> dict[str, Run]:
    tmp = tmp_path_factory.mktemp("efficiency_runs")
    paths = {}
    for name, fields in RUNS.items():
        fields = {"model_name_or_path": tied_model[1] if name == "tied" else demo_assets.model_dir,
                  "train_file": demo_assets.train_file, "output_dir": str(tmp / name), **SETTINGS, **fields}
        if fields.get("precompute_ref"):
            fields["cache_dir"] = str(tmp / "shared_cache")
        paths[name] = (write_config(tmp / f"{name}.yaml", **fields), tmp / f"{name}.pt")
    stderr = launch_probe_runs(list(paths.values()), tmp / "runs.json", timeout=1500)
    return {name: Run(tmp / name, config, torch.load(probe, weights_only=True), err)
            for (name, (config, probe)), err in zip(paths.items(), stderr)}


def assert_matches_plain(out, expected, weight_tol=1e-5, loss_tol=1e-6):
    expected_losses, expected_weights = expected
    got = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got) == len(expected_losses)
    assert max(abs(a - b) for a, b in zip(got, expected_losses)) < loss_tol, (got, expected_losses)
    final = {}
    for shard in (out / "final").glob("*.safetensors"):
        final.update(load_file(str(shard)))
    assert max(float((final[n] - w).abs().max()) for n, w in expected_weights.items()) < weight_tol


def test_packed_batch_gives_the_padded_log_probs(demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    pairs, _ = load_pairs(demo_assets.train_file, tok, max_length=64, max_prompt_length=None, skip_bad_rows=False,
                          cache_dir=None)
    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    indices = [0, 3, 5, 7]
    padded, packed = collate(pairs, indices, tok.pad_token_id), collate(pairs, indices, tok.pad_token_id, packed=True)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].numel() == int(padded["attention_mask"].sum())  # no padding at all
    with torch.no_grad():
        want = sequence_logps(model(**{k: padded[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits,
                              padded["input_ids"], padded["loss_mask"], 7)
        got = sequence_logps(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                   use_cache=False).logits,
                             packed["input_ids"], packed["loss_mask"], 7, packed["sequence_ids"], 2 * len(indices))
    assert torch.equal(got[1], want[1])
    assert torch.allclose(got[0], want[0], atol=1e-4, rtol=0)


def test_logits_path_run_matches_plain_dpo(demo_assets, runs):
    """fused_lm_head off: the model returns its full logits and sequence_logps scores them."""
    run = runs["logits"]
    assert run.probe["fused_head"] is False
    assert_matches_plain(run.out, plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD))


def test_fused_head_with_tied_embeddings_matches_plain_dpo(demo_assets, tied_model, runs):
    """lm_head sharing the input embedding's ZeRO-3 parameter: both uses' gradients reach the one weight."""
    model, tied = tied_model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    run = runs["tied"]
    assert run.probe["fused_head"] is True
    assert_matches_plain(run.out, plain_dpo(tied, demo_assets.train_file, SETTINGS, WORLD))


@pytest.mark.parametrize("attention", ["auto", "sdpa", "eager"])
def test_padding_free_run_matches_plain_dpo(demo_assets, runs, attention):
    run = runs[f"packed_{attention}"]
    # auto on CPU: the model's default kernel, sdpa, called once per packed sequence; both policy and reference
    # engines are built with it
    assert run.probe["attention"] == ["sdpa_packed" if attention == "auto" else attention] * 2
    first = read_metrics(run.out)[0]
    assert first["token_occupancy"] == 1.0
    assert_matches_plain(run.out, plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD),
                         loss_tol=1e-5)


def test_padded_run_matches_plain_dpo(demo_assets, runs):
    run = runs["padded"]
    assert run.probe["attention"] == ["sdpa"] * 2
    assert read_metrics(run.out)[0]["token_occupancy"] < 1.0  # the demo pairs differ in length
    assert_matches_plain(run.out, plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD))


def test_token_budget_weights_every_pair_equally(demo_assets, runs):
    run = runs["budget"]
    cfg = load_config(str(run.config))
    budget = cfg.max_tokens_per_micro_batch
    pairs, _ = load_pairs(demo_assets.train_file, AutoTokenizer.from_pretrained(demo_assets.model_dir), max_length=cfg.max_length,
                          max_prompt_length=None, skip_bad_rows=False, cache_dir=None)
    sampler = PairSampler.for_config(cfg, pairs, WORLD)
    steps = [[i for r in range(WORLD) for mb in sampler.micro_batches(k, r) for i in mb] for k in range(3)]
    sizes = {len(mb) for k in range(3) for r in range(WORLD) for mb in sampler.micro_batches(k, r)}
    assert len(sizes) > 1  # the weighting is really exercised
    for mb in (mb for k in range(3) for r in range(WORLD) for mb in sampler.micro_batches(k, r)):
        assert 2 * len(mb) * max(pairs.length(i) for i in mb) <= budget or len(mb) == 1
    # Micro-batches of 1-4 pairs sum gradients in another grouping than the pair-by-pair reference; Adam's
    # m/sqrt(v) magnifies that rounding for near-zero gradients, so weights get 5e-5 (2.5% of one step's lr).
    # A wrong per-pair weighting would already show in the step losses, held to 1e-6.
    assert_matches_plain(run.out, plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD, steps),
                         weight_tol=5e-5)


def test_precomputed_reference_matches_live_and_is_reused(demo_assets, runs):
    run, again = runs["cached"], runs["cached_again"]
    cache = Path(load_config(str(run.config)).cache_dir)
    assert run.probe["reference"] == "CachedReference"
    assert "reference log-probs of 96 pairs written" in run.stderr
    shards = sorted(p.name for p in next(cache.glob("ref-*")).glob("rank-*.safetensors"))
    assert shards == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    assert_matches_plain(run.out, plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD),
                         loss_tol=1e-5)
    assert "reference log-probs of" not in again.stderr and "reference log-probs read from" in again.stderr
    assert again.probe["deepspeed_engines"] == 1  # a run with the cache builds no reference engine at all
    assert [m["loss"] for m in read_metrics(again.out)] == [m["loss"] for m in read_metrics(run.out)]
