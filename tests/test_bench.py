"""`dpo-ds bench`: a real training step on a random-init model, with figures checked against the pairs it ran."""
from __future__ import annotations

import json

import pytest

from dpo_ds.bench import synthetic_pairs
from dpo_ds.config import TrainConfig
from dpo_ds.data import PairSampler
from helpers import launch, run_cli

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


SPLIT = {"reference_forward", "policy_forward", "backward", "optimizer"}


def bench_args(model_dir: str, out, *extra: str) -> list[str]:
    return ["bench", "--model", model_dir, "--lengths", "lognormal:24,0.5", "--max_length", "64", "--precision", "fp32",
            "--micro_batch_size", "3", "--warmup", "1", "--steps", "2", "--json", "--output_dir", str(out), *extra]


def report(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def one_group_tokens(model_dir: str) -> tuple[int, int, int]:
    """(real, processed) tokens of bench_args' timed steps (1 and 2) on one data-parallel group, from the same
    synthetic pairs and sampler, written out here (a right-padded micro-batch processes 2B rows as wide as its
    longest sequence), and the sum of their sequences' squared lengths."""
    vocab = json.load(open(f"{model_dir}/config.json"))["vocab_size"]
    cfg = TrainConfig(micro_batch_size=3)
    pairs = synthetic_pairs(3 * 3, "lognormal:24,0.5", 64, vocab, cfg.seed)
    sampler = PairSampler.for_config(cfg, pairs, 1)
    real = processed = squared = 0
    for step in (1, 2):
        for batch in sampler.micro_batches(step, 0):
            seqs = [len(pairs.prompt[i]) + len(c[i]) for c in (pairs.chosen, pairs.rejected) for i in batch]
            real, processed = real + sum(seqs), processed + len(seqs) * max(seqs)
            squared += sum(n * n for n in seqs)
    return real, processed, squared


def test_single_process_bench_reports_the_padding_it_really_ran(demo_assets, tmp_path):
    r = report(run_cli(bench_args(demo_assets.model_dir, tmp_path, "--padding_free", "false")).stdout)
    assert (r["world_size"], r["timed_steps"], r["reference"], r["padding_free"]) == (1, 2, "live", False)
    assert r["fused_lm_head"] is True and r["attention"] == "sdpa"
    assert r["active_params"] == r["params"] > 0  # a dense model: every token passes through all of it
    real, processed, squared = one_group_tokens(demo_assets.model_dir)
    assert r["token_occupancy"] == pytest.approx(real / processed)
    assert r["token_occupancy"] < 1.0  # log-normal lengths do pad
    # gradient_checkpointing auto: a model this small runs at ZeRO stage 0 and its activations fit, so no recompute
    assert r["gradient_checkpointing"] is False
    # plan's FLOP count of the real tokens, per timed step: 2 FLOPs per parameter per token for each of the policy
    # forward and the live reference's forward, twice that for the backward; causal attention 2 x layers x q_dim
    # x length^2 per sequence and forward, its backward twice that
    config = json.load(open(f"{demo_assets.model_dir}/config.json"))
    attention = 2 * config["num_hidden_layers"] * config["hidden_size"] * squared  # q_dim = hidden here
    assert r["flops_per_step"] == pytest.approx((2 * 4 * r["params"] * real + 4 * attention) / 2, rel=1e-9)
    times = r["step_time_s"]
    assert 0 < times["min"] <= times["median"] <= times["max"]
    assert r["tokens_per_s"] == pytest.approx(real / (times["median"] * 2), rel=0.5)  # total time / 2 steps
    assert set(r["split_s_per_step"]) == SPLIT and all(v > 0 for v in r["split_s_per_step"].values())
    assert sum(r["split_s_per_step"].values()) <= times["max"] * 1.05
    assert r["peak_memory_gib"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None  # no peak known for a CPU


def test_two_rank_bench_with_cached_reference_and_packing(demo_assets, tmp_path):
    """padding_free auto: the demo model's attention is sdpa, so rows are packed and each sequence is attended
    alone (sdpa_packed)."""
    proc = launch(["-m", "dpo_ds", *bench_args(demo_assets.model_dir, tmp_path, "--precompute_ref", "true",
                                              "--peak_tflops", "1")])
    r = report(proc.stdout)
    assert (r["world_size"], r["reference"], r["token_occupancy"]) == (2, "cached", 1.0)
    assert r["padding_free"] is True and r["attention"] == "sdpa_packed"
    split = r["split_s_per_step"]
    assert split["reference_forward"] < split["policy_forward"] / 10  # a cache lookup: no reference engine runs
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 2)  # two devices of 1 TFLOP/s each


def test_sequence_parallel_bench_counts_each_pair_once(demo_assets, tmp_path):
    """2 ranks at S = 2: one data-parallel group, whose 2 ranks share every micro-batch; the tokens are those of
    one group's pairs, not twice as many."""
    proc = launch(["-m", "dpo_ds", *bench_args(demo_assets.model_dir, tmp_path, "--sequence_parallel_size", "2")])
    r = report(proc.stdout)
    assert (r["world_size"], r["sequence_parallel_size"], r["attention"]) == (2, 2, "sdpa")
    assert r["gradient_checkpointing"] is True  # auto: sequence parallelism runs on ZeRO-3, which keeps the recompute
    real, processed, _ = one_group_tokens(demo_assets.model_dir)
    assert r["token_occupancy"] == pytest.approx(real / processed)
    times = r["step_time_s"]  # two timed steps: their total time is min + max
    assert r["tokens_per_s"] * (times["min"] + times["max"]) == pytest.approx(real, rel=1e-9)
