"""2-rank ZeRO-3 DPO (GA 2, gradient checkpointing, offloaded reference engine) against a plain
single-process PyTorch DPO written here from the formula, pair by pair, without padding or DeepSpeed."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import launch, read_metrics, write_config

SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, shuffle=False,
                learning_rate=2e-3, warmup_steps=1, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=0.5,
                beta=0.1, logging_steps=1, gradient_checkpointing=True, ref_offload=True, seed=0)
WORLD = 2


def plain_dpo(model_dir: str, train_file: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and final weights of textbook DPO on pairs [k*G, (k+1)*G) for step k."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(train_file)]

    def logp(model, prompt: str, completion: str) -> torch.Tensor:
        prompt_ids = tok(prompt)["input_ids"]
        full = tok(prompt + completion)["input_ids"]
        completion_ids = full[len(prompt_ids):]
        if completion_ids[-1] != tok.eos_token_id:
            completion_ids = completion_ids + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + completion_ids])
        token_logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(
            -1, ids[0, 1:, None])[:, 0]
        return token_logps[len(prompt_ids) - 1:].sum()

    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": SETTINGS["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=SETTINGS["learning_rate"])
    steps, warmup = SETTINGS["max_steps"], SETTINGS["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    g = SETTINGS["micro_batch_size"] * SETTINGS["gradient_accumulation_steps"] * WORLD
    beta = SETTINGS["beta"]
    losses = []
    for k in range(steps):
        opt.zero_grad()
        total = 0.0
        for row in rows[k * g:(k + 1) * g]:
            with torch.no_grad():
                ref_c, ref_r = logp(reference, row["prompt"], row["chosen"]), logp(reference, row["prompt"], row["rejected"])
            pol_c, pol_r = logp(policy, row["prompt"], row["chosen"]), logp(policy, row["prompt"], row["rejected"])
            loss = -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))) / g
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), SETTINGS["max_grad_norm"])
        opt.step()
        sched.step()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in policy.named_parameters()}


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


def test_losses_and_weights_match_plain_pytorch(two_rank_run, demo_assets):
    out, _ = two_rank_run
    expected_losses, expected_weights = plain_dpo(demo_assets.model_dir, demo_assets.train_file)
    got_losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got_losses) == SETTINGS["max_steps"]
    for got, want in zip(got_losses, expected_losses):
        assert abs(got - want) < 1e-6, (got_losses, expected_losses)
    exported = {}
    for shard in sorted((out / "final").glob("*.safetensors")):
        exported.update(load_file(str(shard)))
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


def test_exported_model_gives_the_engines_logits(two_rank_run):
    out, probe = two_rank_run
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["probe"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "final").eos_token_id is not None
