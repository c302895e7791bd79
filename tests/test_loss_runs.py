"""End-to-end 2-rank ZeRO-3 runs of the other losses, and the NaN/Inf guard."""
from __future__ import annotations

import math
import re

import pytest
import torch

from helpers import launch, launch_probe_runs, read_metrics, write_config

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


BASE = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=4, shuffle=False,
            learning_rate=3e-3, lr_scheduler="constant", logging_steps=1, seed=0)


@pytest.fixture
def config(demo_assets, tmp_path):
    def make(**fields):
        return write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir,
                            train_file=demo_assets.train_file, output_dir=str(tmp_path / "out"), **{**BASE, **fields})
    return make


@pytest.fixture(scope="module")
def probe_runs(demo_assets, tmp_path_factory):
    """The IPO, SimPO and SFT runs, trained one after the other in one launch (tests/dist_train_probe.py --runs):
    loss_type -> (output_dir, the probe's report)."""
    tmp = tmp_path_factory.mktemp("loss_runs")
    fields = {"ipo": dict(beta=0.1), "simpo": {}, "sft": {}}
    runs = {loss: (write_config(tmp / f"{loss}.yaml", model_name_or_path=demo_assets.model_dir,
                                train_file=demo_assets.train_file, output_dir=str(tmp / loss),
                                **{**BASE, "loss_type": loss, **extra}), tmp / f"{loss}.pt")
            for loss, extra in fields.items()}
    launch_probe_runs(list(runs.values()), tmp / "runs.json", timeout=1200)
    return {loss: (tmp / loss, torch.load(probe, weights_only=True)) for loss, (_, probe) in runs.items()}


def train_losses(output_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(output_dir) if "loss" in m]


def test_ipo_first_step_is_its_target_squared(probe_runs):
    out, probe = probe_runs["ipo"]
    losses = train_losses(out)
    assert abs(losses[0] - (1 / (2 * 0.1)) ** 2) < 1e-4  # policy == reference: d = 0, loss = (1/(2 beta))^2
    assert losses[-1] < losses[0]
    assert probe["deepspeed_engines"] == 2 and probe["reference"] == "LiveReference"


@pytest.mark.parametrize("loss_type", ["simpo", "sft"])
def test_reference_free_losses_build_no_reference_engine(probe_runs, loss_type):
    out, probe = probe_runs[loss_type]
    assert probe["deepspeed_engines"] == 1 and probe["reference"] == "NoReference"
    losses = train_losses(out)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_step_is_skipped_and_training_continues(config, tmp_path, precision):
    # DeepSpeed checks gradients for NaN/Inf only under fp16 loss scaling; in fp32/bf16 the skip rests on the
    # all-reduced gradient norm being non-finite.
    launch(["tests/dist_fault_probe.py", "--config", str(config(precision=precision))],
           env={"FAULT_NAN_AT_STEPS": "2"})
    metrics = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in metrics if m["step"] != 2)
    from safetensors.torch import load_file
    for shard in (tmp_path / "out" / "final").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(shard)).values())


def test_consecutive_bad_steps_stop_the_run_naming_step_and_pairs(config, tmp_path):
    proc = launch(["tests/dist_fault_probe.py", "--config", str(config(max_bad_steps=2))],
                  env={"FAULT_NAN_AT_STEPS": "2,3"}, check=False)
    assert proc.returncode != 0
    assert "stopped at step 3: 2 consecutive optimizer steps had NaN/Inf" in proc.stderr
    assert "train.jsonl:9" in proc.stderr  # step 3 (pairs 8..15 in file order) on rank 0 starts at line 9


def test_max_kl_guard_stops_after_saving_a_checkpoint(config, tmp_path):
    proc = launch(["-m", "dpo_ds", "train", "--config", str(config(max_kl=1e-6, stop_on_max_kl=True))], check=False)
    assert proc.returncode != 0  # each rank exits 2; torchrun reports 1
    # step 1 has KL 0 (policy == reference); once updates move the policy, the guard fires
    stopped = re.search(r"stopped at step (\d+): mean KL to the reference exceeded max_kl=1e-06", proc.stderr)
    assert stopped, proc.stderr[-3000:]
    step = int(stopped.group(1))
    assert 1 < step <= BASE["max_steps"]
    kl = {m["step"]: max(m["kl/chosen"], m["kl/rejected"]) for m in read_metrics(tmp_path / "out") if "loss" in m}
    assert kl[step] > 1e-6 and all(kl[s] <= 1e-6 for s in kl if s < step)  # it fired at the first excess
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert not (tmp_path / "out" / "final").exists()
