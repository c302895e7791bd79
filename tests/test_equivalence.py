"""2-rank DPO (GA 2, gradient checkpointing) at every ZeRO stage against a plain single-process PyTorch DPO written
here from the formula, pair by pair, without padding or DeepSpeed: stage 3 with an offloaded ZeRO-3 reference
engine, stages 0-2 with a whole (stage-0) reference engine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import launch, launch_probe_runs, plain_dpo, read_metrics, write_config

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, shuffle=False,
                learning_rate=2e-3, warmup_steps=1, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=0.5,
                beta=0.1, logging_steps=1, gradient_checkpointing=True, ref_offload=True, seed=0, zero_stage="3")
WORLD = 2


@pytest.fixture(scope="module")
def two_rank_run(demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equivalence")
    cfg = write_config(tmp / "run.yaml", model_name_or_path=demo_assets.model_dir, train_file=demo_assets.train_file,
                       output_dir=str(tmp / "out"), **SETTINGS)
    launch(["tests/dist_train_probe.py", str(cfg), str(tmp / "probe.pt")], nproc=WORLD)
    return tmp / "out", torch.load(tmp / "probe.pt", weights_only=True)


def test_first_logged_loss_is_ln2_when_policy_is_reference(two_rank_run):
    out, _ = two_rank_run
    first = read_metrics(out)[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/margins"] == 0.0 and first["kl/chosen"] == 0.0


def exported_weights(out) -> dict[str, torch.Tensor]:
    exported = {}
    for shard in sorted((out / "final").glob("*.safetensors")):
        exported.update(load_file(str(shard)))
    return exported


@pytest.fixture(scope="module")
def plain_run(demo_assets):
    return plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD)


def test_losses_and_weights_match_plain_pytorch(two_rank_run, demo_assets, plain_run):
    out, _ = two_rank_run
    expected_losses, expected_weights = plain_run
    got_losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got_losses) == SETTINGS["max_steps"]
    for got, want in zip(got_losses, expected_losses):
        assert abs(got - want) < 1e-6, (got_losses, expected_losses)
    exported = exported_weights(out)
    assert set(exported) == set(expected_weights)
    initial = load_file(f"{demo_assets.model_dir}/model.safetensors")
    worst = max(float((exported[n] - w).abs().max()) for n, w in expected_weights.items())
    moved = max(float((exported[n] - initial[n]).abs().max()) for n in expected_weights)
    assert moved > 1e-3  # training really changed the weights...
    assert worst < 1e-5  # ...exactly as the plain PyTorch DPO did


def test_reference_is_frozen_offloaded_and_has_no_optimizer(two_rank_run):
    _, probe = two_rank_run
    assert probe["ref_max_change"] == 0.0
    assert not probe["ref_requires_grad"]
    assert probe["ref_optimizer"] == "DeepSpeedZeRoOffload"
    assert probe["ref_offload_device"].endswith("cpu")


def test_auto_values_reach_the_engines(two_rank_run, demo_assets):
    """ds_configs' "auto" values are resolved by us and read back from DeepSpeed's own resolved config."""
    _, probe = two_rank_run
    hidden = json.load(open(f"{demo_assets.model_dir}/config.json"))["hidden_size"]
    got = probe["policy_resolved"]
    assert got["reduce_bucket_size"] == hidden * hidden
    assert got["prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert got["param_persistence_threshold"] == 10 * hidden
    assert got["gradient_clipping"] == SETTINGS["max_grad_norm"]
    assert (got["micro_batch"], got["grad_accum"]) == (SETTINGS["micro_batch_size"], SETTINGS["gradient_accumulation_steps"])
    assert got["train_batch"] == SETTINGS["micro_batch_size"] * SETTINGS["gradient_accumulation_steps"] * WORLD
    assert got["zero_stage"] == 3 and got["bf16"] is False
    assert probe["policy_checkpointing"] is True
    assert probe["fused_head"] is True  # the default: log-probs scored inside lm_head (Llama)
    # after the run: lr is the schedule's value at the end; decay only on the matrices' group
    assert [wd for _, wd in got["optimizer_groups"]] == [SETTINGS["weight_decay"], 0.0]
    # the CPU preset's PyTorch AdamW runs fused (one kernel for the whole partition, not a per-element loop)
    assert (got["optimizer"], got["optimizer_fused"]) == ("AdamW", True)


def test_exported_model_gives_the_engines_logits(two_rank_run):
    out, probe = two_rank_run
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["probe"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "final").eos_token_id is not None


LOWER_STAGES = ("0", "1", "2")


def deepspeed_shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed*")} if Path("/dev/shm").is_dir() else set()


@pytest.fixture(scope="module")
def lower_stage_runs(demo_assets, tmp_path_factory):
    """Stages 0, 1 and 2 in one launch (2 ranks), with the /dev/shm segments DeepSpeed left behind."""
    tmp = tmp_path_factory.mktemp("equivalence_stages")
    runs = [(write_config(tmp / f"stage-{stage}.yaml", model_name_or_path=demo_assets.model_dir,
                          train_file=demo_assets.train_file, output_dir=str(tmp / f"out-{stage}"),
                          **{**SETTINGS, "zero_stage": stage}), tmp / f"probe-{stage}.pt") for stage in LOWER_STAGES]
    before = deepspeed_shm_segments()
    logs = launch_probe_runs(runs, tmp / "runs.json", nproc=WORLD)
    left = deepspeed_shm_segments() - before
    return {stage: (tmp / f"out-{stage}", torch.load(probe, weights_only=True), log)
            for stage, (_, probe), log in zip(LOWER_STAGES, runs, logs)}, left


@pytest.mark.parametrize("stage", LOWER_STAGES)
def test_every_zero_stage_matches_plain_pytorch(lower_stage_runs, demo_assets, plain_run, stage):
    out, probe, log = lower_stage_runs[0][stage]
    assert probe["policy_resolved"]["zero_stage"] == int(stage)
    assert f"policy engine: ZeRO stage {stage} (set by zero_stage)" in log
    # the reference beside a whole-model policy: a whole (stage-0) frozen engine, untouched by training
    assert probe["ref_zero_stage"] == 0 and probe["ref_max_change"] == 0.0 and not probe["ref_requires_grad"]
    expected_losses, expected_weights = plain_run
    got_losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got_losses) == SETTINGS["max_steps"]
    for got, want in zip(got_losses, expected_losses):
        assert abs(got - want) < 1e-6, (stage, got_losses, expected_losses)
    exported = exported_weights(out)
    assert set(exported) == set(expected_weights)
    worst = max(float((exported[n] - w).abs().max()) for n, w in expected_weights.items())
    assert worst < 1e-5, (stage, worst)
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=probe["probe"]).logits, probe["logits"], atol=1e-5, rtol=0)


def test_two_rank_runs_leave_no_shared_memory_segments(lower_stage_runs):
    """DeepSpeed's CPU shared-memory allreduce (switched on by LOCAL_SIZE) never unlinks its /dev/shm segment."""
    assert lower_stage_runs[1] == set()
