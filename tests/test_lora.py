"""LoRA DPO: 2-rank ZeRO-3 runs against a plain single-process PEFT DPO, the merged and adapter outputs,
checkpoints (adapter only), exact resume and `dpo-ds convert` both ways.

Four 2-rank launches on the tiny demo model:
- `adapter_run`: from a saved adapter (non-zero B, its own r/alpha/targets), live reference = frozen copy of it;
- `fresh_run`: fresh adapter, precomputed reference (base with the adapter off), checkpoints at steps 2 and 4;
- `resumed_run`: the fresh run resumed from its step-2 checkpoint;
- `qlora_run`: `adapter_run` over an nf4 base (bitsandbytes on CPU), checkpoint at step 2, then resumed from it
  on 1 rank (LoRA resume at another world size, through the universal checkpoint).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dpo_ds.lora import peft_model_built
from helpers import launch, plain_dpo, read_metrics, run_cli, write_config, write_starting_adapter

# starts ranks or the CLI in subprocesses (tests/conftest.py). peft's PeftModel.__init__ reads transformers'
# deprecated `is_gradient_checkpointing`: every PeftModel here (and in dpo_ds) is built under lora.peft_model_built,
# and any such warning that still comes through fails the test.
pytestmark = [pytest.mark.distributed,
              pytest.mark.filterwarnings("error:`is_gradient_checkpointing` is deprecated:FutureWarning")]

SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, shuffle=False,
                learning_rate=5e-3, warmup_steps=1, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=0.5,
                beta=0.1, logging_steps=1, gradient_checkpointing=True, seed=0)
WORLD = 2
ADAPTER_R, ADAPTER_ALPHA, ADAPTER_TARGETS = 4, 8, ["q_proj", "v_proj", "down_proj"]


def _weights(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _merged(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """base + B A * alpha / r for every adapted weight, from the adapter file's own tensors."""
    out = dict(base)
    for key, a in adapter.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = base[f"{module}.weight"] + (b @ a) * scaling
    return out


@pytest.fixture(scope="module")
def starting_adapter(demo_assets, tmp_path_factory):
    """A PEFT adapter (as an SFT stage would leave it): non-default r, alpha and targets, B non-zero."""
    return write_starting_adapter(demo_assets.model_dir, tmp_path_factory.mktemp("lora") / "sft_adapter",
                                  ADAPTER_TARGETS, ADAPTER_R, ADAPTER_ALPHA)


def _probed_run_from_adapter(tmp: Path, demo_assets, starting_adapter, settings: dict):
    """A 2-rank run from the starting adapter under tests/dist_train_probe.py: (output dir, config, probe)."""
    cfg = write_config(tmp / "run.yaml", model_name_or_path=demo_assets.model_dir, train_file=demo_assets.train_file,
                       output_dir=str(tmp / "out"), lora_adapter=str(starting_adapter), **settings)
    launch(["tests/dist_train_probe.py", str(cfg), str(tmp / "probe.pt")], nproc=WORLD)
    return tmp / "out", cfg, torch.load(tmp / "probe.pt", weights_only=True)


@pytest.fixture(scope="module")
def adapter_run(demo_assets, starting_adapter, tmp_path_factory):
    out, _, probe = _probed_run_from_adapter(tmp_path_factory.mktemp("lora_adapter_run"), demo_assets,
                                             starting_adapter, SETTINGS)
    return out, probe


FRESH = dict(SETTINGS, max_steps=4, save_steps=2, lora_r=8, lora_alpha=16, precompute_ref=True)


@pytest.fixture(scope="module")
def fresh_run(demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_fresh_run")
    cfg = write_config(tmp / "run.yaml", model_name_or_path=demo_assets.model_dir, train_file=demo_assets.train_file,
                       output_dir=str(tmp / "out"), **FRESH)
    proc = launch(["-m", "dpo_ds", "train", "--config", str(cfg)], nproc=WORLD)
    # issue 13: no deprecation warnings in a normal run (peft triggers transformers' is_gradient_checkpointing one);
    # issue 25: nor bitsandbytes' hub-kernel warning (peft imports bitsandbytes for plain LoRA too)
    assert not [line for line in proc.stderr.splitlines() if "deprecat" in line.lower() or "kernels-community" in line], \
        proc.stderr[-3000:]
    return tmp / "out", cfg


def test_matches_plain_peft_dpo_from_the_same_adapter(adapter_run, demo_assets, starting_adapter):
    out, probe = adapter_run
    with peft_model_built():
        policy = PeftModel.from_pretrained(_base(demo_assets.model_dir), starting_adapter, is_trainable=True)
    reference = copy.deepcopy(policy).requires_grad_(False)
    expected_losses, _ = plain_dpo(demo_assets.model_dir, demo_assets.train_file, SETTINGS, WORLD,
                                   policy=policy, reference=reference)
    got_losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got_losses) == SETTINGS["max_steps"]
    assert abs(got_losses[0] - math.log(2)) < 1e-6  # reference = the starting adapter, a frozen copy
    for got, want in zip(got_losses, expected_losses):
        assert abs(got - want) < 1e-6, (got_losses, expected_losses)
    expected = get_peft_model_state_dict(policy)
    saved = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(expected)
    start = load_file(str(starting_adapter / "adapter_model.safetensors"))
    assert max(float((saved[k] - start[k]).abs().max()) for k in saved) > 1e-3  # the adapter really trained...
    assert max(float((saved[k] - expected[k]).abs().max()) for k in saved) < 1e-5  # ...as plain PEFT DPO did
    # the adapter's own r, alpha and targets were used
    config = json.loads((out / "final_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (ADAPTER_R, ADAPTER_ALPHA,
                                                                                      sorted(ADAPTER_TARGETS))
    # one engine: the reference is the policy's own with the adapter switched
    assert probe["deepspeed_engines"] == 1 and probe["reference"] == "AdapterReference"
    assert probe["policy_checkpointing"] is True


def test_outputs_merged_model_and_peft_adapter(adapter_run, demo_assets):
    out, probe = adapter_run
    base = load_file(f"{demo_assets.model_dir}/model.safetensors")
    adapter = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    merged = _merged(base, adapter, ADAPTER_ALPHA / ADAPTER_R)
    final = _weights(out / "final")
    assert set(final) == set(base)
    assert max(float((final[n] - w).abs().max()) for n, w in merged.items()) < 1e-6
    assert sum(not torch.equal(final[n], base[n]) for n in base) == 2 * 3  # 2 layers x 3 adapted modules
    # final_adapter/ loads with peft on the base and computes what final/ computes (and the engine did)
    with torch.no_grad(), peft_model_built():
        peft_logits = PeftModel.from_pretrained(_base(demo_assets.model_dir), out / "final_adapter").eval()(
            input_ids=probe["probe"]).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()(
            input_ids=probe["probe"]).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5, rtol=0)
    assert torch.allclose(merged_logits, probe["logits"], atol=1e-5, rtol=0)


def test_fresh_adapter_starts_at_ln2_and_checkpoints_hold_only_the_adapter(fresh_run, demo_assets):
    out, _ = fresh_run
    first = read_metrics(out)[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/margins"] == 0.0
    ckpt = out / "checkpoints" / "step-00000004"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds", exclude_frozen_parameters=True)
    assert trained and all(".lora_" in name for name in trained)  # optimizer state only for adapter params
    base_bytes = (Path(demo_assets.model_dir) / "model.safetensors").stat().st_size
    ds_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    assert ds_bytes < base_bytes / 4, (ds_bytes, base_bytes)
    # frozen base: every weight LoRA does not touch is exported bit for bit
    base = load_file(f"{demo_assets.model_dir}/model.safetensors")
    final = _weights(out / "final")
    untouched = [n for n in base if not n.endswith("proj.weight")]
    assert untouched and all(torch.equal(final[n], base[n]) for n in untouched)


def test_convert_lora_checkpoint_both_ways(fresh_run, tmp_path):
    out, _ = fresh_run
    ckpt = out / "checkpoints" / "step-00000004"  # the last step: equals the run's final outputs
    run_cli(["convert", str(ckpt), str(tmp_path / "merged"), "--dtype", "fp32"])
    run_cli(["convert", str(ckpt), str(tmp_path / "adapter"), "--adapter_only"])
    final, merged = _weights(out / "final"), _weights(tmp_path / "merged")
    assert set(merged) == set(final)
    assert max(float((merged[n] - final[n]).abs().max()) for n in final) < 1e-6
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    assert set(adapter) == set(expected) and all(torch.equal(adapter[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == FRESH["lora_r"]


def test_resume_is_exact(fresh_run, tmp_path):
    out, cfg = fresh_run
    resumed = tmp_path / "resumed"
    launch(["-m", "dpo_ds", "train", "--config", str(cfg), "--output_dir", str(resumed),
            "--resume_from", str(out / "checkpoints" / "step-00000002"), "--cache_dir", str(out / "caches")],
           nproc=WORLD)
    full = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    again = {m["step"]: m["loss"] for m in read_metrics(resumed) if "loss" in m}
    assert sorted(again) == [3, 4] and all(again[s] == full[s] for s in again)
    expected = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed / "final_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    shutil.rmtree(resumed)


# --- QLoRA -------------------------------------------------------------------------------------------------------
QLORA = dict(SETTINGS, save_steps=2, lora_quantize="nf4")


def _nf4_base(model_dir):
    """The base as transformers' QLoRA recipe loads it: nf4, double quantization, fp32 compute and storage; without
    bitsandbytes' AVX512-BF16 CPU kernel, as dpo-ds runs it (lora.load_quantized_base): on CPUs that have it, that
    kernel serves only eval-mode forwards without gradients (the reference's), with other rounding than the policy's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def qlora_run(demo_assets, starting_adapter, tmp_path_factory):
    return _probed_run_from_adapter(tmp_path_factory.mktemp("qlora_run"), demo_assets, starting_adapter, QLORA)


def test_qlora_matches_plain_peft_bitsandbytes_dpo(qlora_run, demo_assets, starting_adapter):
    out, _, probe = qlora_run
    with peft_model_built():
        policy = PeftModel.from_pretrained(_nf4_base(demo_assets.model_dir), starting_adapter, is_trainable=True)
        reference = PeftModel.from_pretrained(_nf4_base(demo_assets.model_dir), starting_adapter).requires_grad_(False)
    expected_losses, _ = plain_dpo(demo_assets.model_dir, demo_assets.train_file, QLORA, WORLD,
                                   policy=policy, reference=reference)
    got_losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got_losses) == QLORA["max_steps"] and abs(got_losses[0] - math.log(2)) < 1e-6
    assert all(abs(got - want) < 1e-6 for got, want in zip(got_losses, expected_losses)), (got_losses, expected_losses)
    expected = get_peft_model_state_dict(policy)
    saved = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    start = load_file(str(starting_adapter / "adapter_model.safetensors"))
    assert set(saved) == set(expected) and max(float((saved[k] - start[k]).abs().max()) for k in saved) > 1e-3
    assert max(float((saved[k] - expected[k]).abs().max()) for k in saved) < 1e-5
    # the engine's final state computes what the plain nf4 PEFT model computes
    with torch.no_grad():
        plain_logits = policy.eval()(input_ids=probe["probe"]).logits
    assert torch.allclose(plain_logits, probe["logits"], atol=1e-5, rtol=0)
    # the packed 4-bit weights (every adapted Linear of the 2 layers) are frozen and ZeRO-3 partitioned over 2 ranks
    assert len(probe["nf4_weights"]) == 2 * 7
    assert all(not grad and part == -(-numel // WORLD) for numel, part, grad in probe["nf4_weights"]), probe["nf4_weights"]
    assert probe["deepspeed_engines"] == 1 and probe["reference"] == "AdapterReference"


def test_qlora_final_merges_into_the_original_base_and_checkpoints_hold_the_adapter(qlora_run, demo_assets, tmp_path):
    out, _, _ = qlora_run
    base = load_file(f"{demo_assets.model_dir}/model.safetensors")
    adapter = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    final = _weights(out / "final")
    assert set(final) == set(base)
    merged = _merged(base, adapter, ADAPTER_ALPHA / ADAPTER_R)
    assert max(float((final[n] - w).abs().max()) for n, w in merged.items()) < 1e-6
    # ...the original weights, not their nf4 approximation (which is far from them)
    nf4 = _nf4_base(demo_assets.model_dir).model.layers[0].self_attn.q_proj.weight
    import bitsandbytes.functional as bnb_functional

    dequantized = bnb_functional.dequantize_4bit(nf4.data, nf4.quant_state)
    assert float((dequantized - base["model.layers.0.self_attn.q_proj.weight"]).abs().max()) > 1e-3
    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config and AutoModelForCausalLM.from_pretrained(out / "final") is not None
    ckpt = out / "checkpoints" / "step-00000002"
    assert "quantization_config" not in json.loads((ckpt / "hf" / "config.json").read_text())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds", exclude_frozen_parameters=True)
    assert trained and all(".lora_" in name for name in trained)
    ds_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    assert ds_bytes < (Path(demo_assets.model_dir) / "model.safetensors").stat().st_size / 4
    # `dpo-ds convert` of the QLoRA checkpoint: its adapter merged into the original base too
    run_cli(["convert", str(ckpt), str(tmp_path / "merged"), "--dtype", "fp32"])
    converted = _weights(tmp_path / "merged")
    expected = _merged(base, {n: t.detach() for n, t in trained.items()}, ADAPTER_ALPHA / ADAPTER_R)
    assert set(converted) == set(base) and max(float((converted[n] - w).abs().max()) for n, w in expected.items()) < 1e-6
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_lora_resume_at_another_world_size(qlora_run, tmp_path):
    """2 -> 1 ranks through the universal checkpoint: the 4-bit base is rebuilt from its files, the adapter and its
    optimizer state come from the checkpoint; step 3 and the final adapter continue the 2-rank run."""
    out, cfg, _ = qlora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "latest").write_text("step-00000002\n")
    proc = launch(["-m", "dpo_ds", "train", "--config", str(cfg), "--output_dir", str(resumed), "--resume_from", "auto",
                   "--cache_dir", str(out / "caches"),
                   "--gradient_accumulation_steps", str(QLORA["gradient_accumulation_steps"] * WORLD)], nproc=1)
    assert "resumed from step 2" in proc.stderr and (resumed / "checkpoints" / "step-00000002" / "ds_universal").is_dir()
    full = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    again = {m["step"]: m["loss"] for m in read_metrics(resumed) if "loss" in m}
    assert sorted(again) == [3] and abs(again[3] - full[3]) <= 1e-6 * abs(full[3]), (again, full)
    expected = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed / "final_adapter" / "adapter_model.safetensors"))
    assert set(got) == set(expected) and max(float((got[k] - expected[k]).abs().max()) for k in expected) < 1e-5
