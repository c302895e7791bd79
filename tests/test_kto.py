"""KTO on unpaired rows end to end: 2-rank ZeRO-3 against a plain single-process KTO written out here (the KL
reference point over both ranks), the same run packed (padding_free) with precomputed reference log-probs of
the completions and of their mismatched pairs, LoRA from an adapter against plain PEFT KTO, exact resume after a
stop, and `dpo-ds eval` on unpaired data."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import launch, launch_probe_runs, plain_dpo, read_metrics, write_config, write_starting_adapter

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
LAMBDA_D, LAMBDA_U = 1.0, 2.0
SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, shuffle=False,
                learning_rate=5e-3, adam_epsilon=1e-5, warmup_steps=0, lr_scheduler="linear", weight_decay=0.0,
                max_grad_norm=1.0, beta=0.1, logging_steps=1, seed=0, loss_type="kto", desirable_weight=LAMBDA_D,
                undesirable_weight=LAMBDA_U)
# adam_epsilon 1e-5: KTO's gradients are small (beta s'(.) per example), and with 1e-8 Adam's update of elements
# whose gradient is near 0 turns on the last bits of the gradient (1e-4 apart after 3 steps, in either run)
RUNS = {"live": {}, "packed_precomputed": dict(padding_free=True, precompute_ref=True), "lora": {}}
LORA_TARGETS = ["q_proj", "v_proj"]


def unpaired_rows(train_file: str) -> list[dict]:
    """Thumbs-up/down rows from the demo pairs: 3 desirable (a chosen completion) to 1 undesirable (a rejected
    one), each from another prompt."""
    pairs = [json.loads(line) for line in open(train_file)][:64]
    return [{"prompt": p["prompt"], "completion": p["chosen"] if k % 4 else p["rejected"], "label": bool(k % 4)}
            for k, p in enumerate(pairs)]


def kto_losses(per_rank_reference_point: bool = False):
    """Plain KTO of a micro-step (plain_dpo's unpaired dicts): z0 = max(0, mean over every rank's mismatched
    completions of log pi - log pi_ref), detached (or each rank's own, to show the difference)."""
    def losses(micro_step, beta):
        out = []
        for b in micro_step:
            parts = [b] if per_rank_reference_point else micro_step
            z0 = torch.cat([(p["kp"] - p["kr"]).detach() for p in parts]).mean().clamp(min=0)
            r = b["p"] - b["r"]
            out.append(torch.where(b["label"], LAMBDA_D * (1 - torch.sigmoid(beta * (r - z0))),
                                   LAMBDA_U * (1 - torch.sigmoid(beta * (z0 - r)))))
        return out
    return losses


@pytest.fixture(scope="module")
def kto_runs(demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto")
    data = tmp / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in unpaired_rows(demo_assets.train_file)))
    adapter = write_starting_adapter(demo_assets.model_dir, tmp / "sft_adapter", LORA_TARGETS)
    fields_of = {**RUNS, "lora": dict(lora_adapter=str(adapter))}
    runs = {name: (write_config(tmp / f"{name}.yaml", model_name_or_path=demo_assets.model_dir, train_file=str(data),
                                output_dir=str(tmp / name), **{**SETTINGS, **fields}), tmp / f"{name}.pt")
            for name, fields in fields_of.items()}
    logs = launch_probe_runs(list(runs.values()), tmp / "runs.json", timeout=1200)
    return tmp, data, dict(zip(RUNS, logs))


def test_kto_on_unpaired_rows_trains_as_plain_pytorch_does(kto_runs, demo_assets):
    """Loss of every step within 1e-6 relative and the final weights within 1e-5 of plain KTO; the reference
    point is over both ranks (each rank's own would give other losses); the weight advice is logged."""
    tmp, data, logs = kto_runs
    want, want_weights = plain_dpo(demo_assets.model_dir, str(data), SETTINGS, WORLD, pair_losses=kto_losses(),
                                   unpaired=True)
    per_rank, _ = plain_dpo(demo_assets.model_dir, str(data), SETTINGS, WORLD,
                            pair_losses=kto_losses(per_rank_reference_point=True), unpaired=True)
    initial = load_file(f"{demo_assets.model_dir}/model.safetensors")
    for name in ("live", "packed_precomputed"):
        metrics = [m for m in read_metrics(tmp / name) if "loss" in m]
        got = [m["loss"] for m in metrics]
        assert len(got) == SETTINGS["max_steps"]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, rel=1e-6), (name, got, want)
        assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0  # policy == reference at step 1, then z0 > 0
        exported = {}
        for shard in sorted((tmp / name / "final").glob("*.safetensors")):
            exported.update(load_file(str(shard)))
        assert max(float((exported[n] - w).abs().max()) for n, w in want_weights.items()) < 1e-5
        assert max(float((exported[n] - initial[n]).abs().max()) for n in want_weights) > 1e-3
    assert any(abs(p - g) > 1e-5 * abs(g) for p, g in zip(per_rank, want))
    # 48 desirable, 16 undesirable with weights 1 and 2: ratio 1.5
    assert "outside the KTO paper's [1, 4/3]; set EITHER desirable_weight in [0.667, 0.889] OR undesirable_weight " \
           "in [2.25, 3]" in logs["live"]


def test_precomputed_reference_holds_the_mismatched_pairs_too(kto_runs):
    tmp, _, logs = kto_runs
    assert "reference log-probs of 64 pairs written to" in logs["packed_precomputed"]
    (cache,) = (tmp / "packed_precomputed" / "caches").glob("ref-*")
    assert json.loads((cache / "complete.json").read_text())["sequences"] == 2  # completion, mismatched


def test_eval_reports_kto_metrics_for_unpaired_rows(kto_runs):
    """`dpo-ds eval` of the trained model on the unpaired rows: one record per row with its label, reward
    beta (log pi - log pi_ref) and its KTO loss at the reference point."""
    tmp, data, _ = kto_runs
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", "eval", "--model", str(tmp / "live" / "final"), "--data",
                           str(data)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["loss_type"], summary["examples"], summary["desirable"]) == ("kto", 64, 48)
    assert summary["kl"] >= 0
    records = [json.loads(line) for line in Path(summary["per_pair_file"]).read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["label"] for r in records] == [r["label"] for r in rows]
    beta = SETTINGS["beta"]
    for r in records:
        reward = beta * (r["policy_logp"] - r["ref_logp"])
        assert r["reward"] == pytest.approx(reward, rel=1e-5, abs=1e-6)
        z = beta * (r["policy_logp"] - r["ref_logp"] - r["reference_point"])
        want = LAMBDA_D * (1 - 1 / (1 + torch.exp(torch.tensor(-z)).item())) if r["label"] else \
            LAMBDA_U * (1 - 1 / (1 + torch.exp(torch.tensor(z)).item()))
        assert r["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert summary["loss"] == pytest.approx(sum(r["loss"] for r in records) / 64, rel=1e-6)


def test_lora_kto_matches_plain_peft_kto(kto_runs, demo_assets):
    """From the same adapter (the reference: base + that adapter, frozen): losses within 1e-6 relative and the
    trained adapter within 1e-5 of plain PEFT KTO."""
    from peft import PeftModel, get_peft_model_state_dict

    from dpo_ds.lora import peft_model_built

    tmp, data, _ = kto_runs
    with peft_model_built():
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.model_dir,
                                                                                dtype=torch.float32),
                                           tmp / "sft_adapter", is_trainable=True)
    reference = copy.deepcopy(policy).requires_grad_(False)
    want, _ = plain_dpo(demo_assets.model_dir, str(data), SETTINGS, WORLD, policy=policy, reference=reference,
                        pair_losses=kto_losses(), unpaired=True)
    got = [m["loss"] for m in read_metrics(tmp / "lora") if "loss" in m]
    assert len(got) == SETTINGS["max_steps"] and got == pytest.approx(want, rel=1e-6)
    expected = get_peft_model_state_dict(policy)
    saved = load_file(str(tmp / "lora" / "final_adapter" / "adapter_model.safetensors"))
    start = load_file(str(tmp / "sft_adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(expected)
    assert max(float((saved[k] - expected[k]).abs().max()) for k in saved) < 1e-5
    assert max(float((saved[k] - start[k]).abs().max()) for k in saved) > 1e-3


def test_kto_resumed_after_a_stop_equals_the_uninterrupted_run(kto_runs, tmp_path):
    """Stopped by a signal after step 1 and resumed: the same losses and final weights as the run never stopped
    (the mismatched partners are fixed per example; the sampler resumes where it stopped)."""
    tmp, _, _ = kto_runs
    args = ["tests/dist_fault_probe.py", "--config", str(tmp / "live.yaml"), "--output_dir", str(tmp_path / "out"),
            "--resume_from", "auto"]
    stopped = launch(args, env={"FAULT_SIGNAL_AT_STEP": "1"}, check=False)
    assert "stopped by a signal after step 1" in stopped.stderr, stopped.stderr[-3000:]
    assert "resumed from step 1" in launch(args).stderr
    losses = [[m["loss"] for m in read_metrics(out) if "loss" in m] for out in (tmp_path / "out", tmp / "live")]
    assert losses[0] == losses[1]
    got, want = ({k: v for shard in sorted((out / "final").glob("*.safetensors")) for k, v in load_file(str(shard)).items()}
                 for out in (tmp_path / "out", tmp / "live"))
    assert all(torch.equal(got[k], want[k]) for k in want)
