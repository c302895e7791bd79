"""End-to-end 2-rank ZeRO-3 runs of every loss of the menu against plain PyTorch, and the NaN/Inf guard."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from helpers import launch, launch_probe_runs, plain_dpo, read_metrics, write_config

from dpo_ds.losses import loss_unit, parse_loss_type

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


BASE = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=4, shuffle=False,
            learning_rate=3e-3, lr_scheduler="constant", logging_steps=1, seed=0)


@pytest.fixture
def config(demo_assets, tmp_path):
    def make(**fields):
        return write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir,
                            train_file=demo_assets.train_file, output_dir=str(tmp_path / "out"), **{**BASE, **fields})
    return make


# ---------------------------------------------------------------------------- the loss menu against plain PyTorch
# Each loss written out here in torch on one micro-step: a list (by rank) of dicts of [B] tensors pc, pr, rc, rr
# (summed log-probs) and nc, nr (completion token counts), as tests/helpers.plain_dpo hands them over.
def _per_pair(formula):
    return lambda: lambda micro_step, beta: [formula(b, beta) for b in micro_step]


def _means(b):
    return {"pc": b["pc"] / b["nc"], "pr": b["pr"] / b["nr"], "rc": b["rc"] / b["nc"], "rr": b["rr"] / b["nr"]}


def _d(b):
    return (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])


def _smoothed(z, eps):
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _exo(b, beta, eps=1e-3):
    z = beta * _d(b)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _aot(micro_step, beta):  # sorted within each rank's micro-batch, as TRL sorts within each device's batch
    return [-F.logsigmoid(beta * (torch.sort(b["pc"] - b["pr"]).values - torch.sort(b["rc"] - b["rr"]).values))
            for b in micro_step]


def _aot_unpaired(micro_step, beta):
    return [-F.logsigmoid(beta * (torch.sort(b["pc"] - b["rc"]).values - torch.sort(b["pr"] - b["rr"]).values))
            for b in micro_step]


def _bco(weight=1.0):
    """bco_pair with its running mean of rewards over every micro-step of every rank so far."""
    seen = {"sum": 0.0, "count": 0}

    def losses(micro_step, beta):
        for b in micro_step:
            seen["sum"] += float(beta * (b["pc"] - b["rc"] + b["pr"] - b["rr"]).detach().sum())
            seen["count"] += 2 * len(b["pc"])
        delta = seen["sum"] / seen["count"]
        return [weight * (-F.logsigmoid(beta * (b["pc"] - b["rc"]) - delta) - F.logsigmoid(-(beta * (b["pr"] - b["rr"]) - delta)))
                for b in micro_step]
    return losses


def _mpo():
    bco = _bco(0.2)

    def losses(micro_step, beta):
        return [0.8 * -F.logsigmoid(beta * _d(b)) + bco_part - b["pc"] / b["nc"]
                for b, bco_part in zip(micro_step, bco(micro_step, beta))]
    return losses


def _discopop(b, beta, tau=0.05):
    z = beta * _d(b)
    return -F.logsigmoid(z) * (1 - torch.sigmoid(z / tau)) + torch.exp(-z) * torch.sigmoid(z / tau)


def _kto(lambda_d: float, lambda_u: float):
    """KTO on the unpaired examples of a micro-step (plain_dpo's unpaired dicts): z0 = max(0, mean over every
    rank's mismatched completions of log pi - log pi_ref), detached."""
    def losses(micro_step, beta):
        z0 = torch.cat([(b["kp"] - b["kr"]).detach() for b in micro_step]).mean().clamp(min=0)
        return [torch.where(b["label"], lambda_d * (1 - torch.sigmoid(beta * (b["p"] - b["r"] - z0))),
                            lambda_u * (1 - torch.sigmoid(beta * (z0 - (b["p"] - b["r"]))))) for b in micro_step]
    return lambda: losses


# run name -> (config fields, plain loss factory)
MENU = {
    "sigmoid": (dict(label_smoothing=0.1), _per_pair(lambda b, beta: _smoothed(beta * _d(b), 0.1))),
    "sigmoid_norm": ({}, _per_pair(lambda b, beta: -F.logsigmoid(beta * _d(_means(b))))),
    "robust": (dict(label_smoothing=0.2), _per_pair(lambda b, beta: (-(0.8) * F.logsigmoid(beta * _d(b))
                                                                      + 0.2 * F.logsigmoid(-beta * _d(b))) / 0.6)),
    "ipo": ({}, _per_pair(lambda b, beta: (_d(_means(b)) - 1 / (2 * beta)) ** 2)),
    "hinge": ({}, _per_pair(lambda b, beta: torch.relu(1 - beta * _d(b)))),
    "exo_pair": ({}, _per_pair(_exo)),
    "nca_pair": ({}, _per_pair(lambda b, beta: -F.logsigmoid(beta * (b["pc"] - b["rc"]))
                               - 0.5 * F.logsigmoid(-beta * (b["pc"] - b["rc"])) - 0.5 * F.logsigmoid(-beta * (b["pr"] - b["rr"])))),
    "bco_pair": ({}, _bco),
    # beta 0.02: targets +-25 keep the squares' fp32 rounding (log-prob sums ~1e-5 relative) under 1e-6 of the loss
    "sppo_hard": (dict(beta=0.02), _per_pair(lambda b, beta: (b["pc"] - b["rc"] - 0.5 / beta) ** 2 + (b["pr"] - b["rr"] + 0.5 / beta) ** 2)),
    "aot": ({}, lambda: _aot),
    "aot_unpaired": ({}, lambda: _aot_unpaired),
    "apo_zero": ({}, _per_pair(lambda b, beta: 1 - torch.sigmoid(beta * (b["pc"] - b["rc"])) + torch.sigmoid(beta * (b["pr"] - b["rr"])))),
    "apo_down": ({}, _per_pair(lambda b, beta: torch.sigmoid(beta * (b["pc"] - b["rc"])) + 1 - torch.sigmoid(beta * _d(b)))),
    "discopop": ({}, _per_pair(_discopop)),
    "simpo": (dict(beta=2.0), _per_pair(lambda b, beta: -F.logsigmoid(beta * (b["pc"] / b["nc"] - b["pr"] / b["nr"]) - 0.5))),
    "sft": ({}, _per_pair(lambda b, beta: -b["pc"] / b["nc"])),
    "mpo": (dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), _mpo),
    "ld_dpo": (dict(loss_type="sigmoid", ld_alpha=0.5), _per_pair(lambda b, beta: -F.logsigmoid(beta * _d(b)))),
    # WPO (use_weighting) with the RPO term, which its weights also scale
    # paired data split into desirable/undesirable examples (unpaired rows: test_kto.py)
    "kto": (dict(desirable_weight=1.2, undesirable_weight=0.9, learning_rate=2e-2), _kto(1.2, 0.9)),
    "wpo": (dict(loss_type="sigmoid", use_weighting=True, rpo_alpha=0.5),
            _per_pair(lambda b, beta: (-F.logsigmoid(beta * _d(b)) + 0.5 * -b["pc"] / b["nc"])
                      * torch.clamp(torch.exp(b["wc"] / b["nc"] + b["wr"] / b["nr"]), max=1.0))),
}
MENU_SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=2, shuffle=False,
                     learning_rate=2e-3, warmup_steps=0, lr_scheduler="linear", weight_decay=0.0, max_grad_norm=1.0,
                     beta=0.1, logging_steps=1, seed=0,
                     zero_stage="3")  # ZeRO-3: the bco_pair resume below goes through the universal checkpoint
WORLD = 2


@pytest.fixture(scope="module")
def probe_runs(demo_assets, tmp_path_factory):
    """Every run of MENU, trained one after the other in two launches (tests/dist_train_probe.py --runs):
    name -> (output_dir, the probe's report)."""
    tmp = tmp_path_factory.mktemp("loss_runs")
    runs = {name: (write_config(tmp / f"{name}.yaml", model_name_or_path=demo_assets.model_dir,
                                train_file=demo_assets.train_file, output_dir=str(tmp / name),
                                **{**MENU_SETTINGS, "loss_type": name, **fields}), tmp / f"{name}.pt")
            for name, (fields, _) in MENU.items()}
    names = list(runs)
    for half in (names[:len(names) // 2], names[len(names) // 2:]):
        launch_probe_runs([runs[name] for name in half], tmp / "runs.json", timeout=1200)
    return {name: (tmp / name, torch.load(probe, weights_only=True)) for name, (_, probe) in runs.items()}


def train_losses(output_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(output_dir) if "loss" in m]


@pytest.mark.parametrize("name", MENU)
def test_every_loss_trains_as_plain_pytorch_does(probe_runs, demo_assets, name):
    """2-rank ZeRO-3 (GA 2) against a single-process PyTorch DPO with the loss written out above: the loss of
    every step within 1e-6 relative."""
    fields, plain_loss = MENU[name]
    settings = {**MENU_SETTINGS, **fields}
    want, _ = plain_dpo(demo_assets.model_dir, demo_assets.train_file, settings, WORLD, pair_losses=plain_loss(),
                        unpaired=loss_unit(parse_loss_type(settings.get("loss_type", name))) == "unpaired")
    got = train_losses(probe_runs[name][0])
    assert len(got) == MENU_SETTINGS["max_steps"]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-9), (name, got, want)
    assert got[-1] != got[0]  # the steps trained something


def test_menu_covers_every_loss():
    from dpo_ds.losses import LOSS_TYPES

    assert set(LOSS_TYPES) <= set(MENU)


def test_weighted_list_logs_each_component(probe_runs):
    """MPO: loss = 0.8 loss/sigmoid + 0.2 loss/bco_pair + loss/sft at every step; bco_pair's running mean logged."""
    for m in (m for m in read_metrics(probe_runs["mpo"][0]) if "loss" in m):
        # rel 1e-6: the weighted sum is taken per pair in fp32, the logged means in float64
        assert m["loss"] == pytest.approx(0.8 * m["loss/sigmoid"] + 0.2 * m["loss/bco_pair"] + m["loss/sft"], rel=1e-6)
        assert "bco_pair/running_mean" in m


def test_bco_pair_resumed_after_a_stop_equals_the_uninterrupted_run(probe_runs, demo_assets, tmp_path):
    """bco_pair's running mean is saved in the checkpoint (trainer_state.json) and restored: stopped by a signal
    after step 1 and resumed, the run logs the uninterrupted run's losses (a fresh mean at step 2 would not)."""
    config = write_config(tmp_path / "bco.yaml", model_name_or_path=demo_assets.model_dir,
                          train_file=demo_assets.train_file, **{**MENU_SETTINGS, "loss_type": "bco_pair"})
    args = ["tests/dist_fault_probe.py", "--config", str(config), "--output_dir", str(tmp_path / "out"),
            "--resume_from", "auto"]
    stopped = launch(args, env={"FAULT_SIGNAL_AT_STEP": "1"}, check=False)
    assert "stopped by a signal after step 1" in stopped.stderr, stopped.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["loss_state"]["bco_pair"]["count"] == 2 * MENU_SETTINGS["micro_batch_size"] * 2 * WORLD
    saved = tmp_path / "at-one-rank" / "checkpoints"
    shutil.copytree(tmp_path / "out" / "checkpoints" / "step-00000001", saved / "step-00000001")
    (saved / "latest").write_text("step-00000001\n")
    assert "resumed from step 1" in launch(args).stderr
    assert train_losses(tmp_path / "out") == train_losses(probe_runs["bco_pair"][0])
    # universal resume: the 2-rank checkpoint resumed on 1 rank (twice the accumulation: the same pairs per
    # step) carries the running mean: it logs what an uninterrupted 1-rank run logs (within fp32 reduction
    # order); a fresh mean would leave out step 1's 16 zero rewards and move step 2's delta by ~its own size
    one_rank = ["--gradient_accumulation_steps", str(2 * MENU_SETTINGS["gradient_accumulation_steps"])]
    resumed = launch(["tests/dist_fault_probe.py", "--config", str(config), "--output_dir", str(saved.parent),
                      "--resume_from", "auto", *one_rank], nproc=1)
    assert "resumed from step 1" in resumed.stderr and (saved / "step-00000001" / "ds_universal").is_dir()
    launch(["-m", "dpo_ds", "train", "--config", str(config), "--output_dir", str(tmp_path / "whole-1"), *one_rank],
           nproc=1)
    got, want = train_losses(saved.parent), train_losses(tmp_path / "whole-1")  # got: the steps after the resume
    assert len(got) == len(want) - 1 == MENU_SETTINGS["max_steps"] - 1
    assert got == pytest.approx(want[1:], rel=1e-6)


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
    assert len(train_losses(out)) == MENU_SETTINGS["max_steps"]  # the values: test_every_loss_trains_as_plain_pytorch_does
    assert (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("precision,zero_stage", [("fp32", "0"), ("bf16", "0"), ("fp32", "3")])
def test_nan_step_is_skipped_and_training_continues(config, tmp_path, precision, zero_stage):
    # DeepSpeed checks gradients for NaN/Inf only under fp16 loss scaling; in fp32/bf16 the skip rests on the
    # all-reduced gradient norm being non-finite (at stage 0 in fp32, engines.lifecycle.guard_plain_optimizer_step's).
    launch(["tests/dist_fault_probe.py", "--config", str(config(precision=precision, zero_stage=zero_stage))],
           env={"FAULT_NAN_AT_STEPS": "2"})
    metrics = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
               for m in metrics if m["step"] != 2)
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
