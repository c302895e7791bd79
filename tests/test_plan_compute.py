"""`dpo-ds plan`'s FLOPs of an optimizer step and its projected step time (issue 23), checked against the FLOPs
written out by hand from a Llama's widths; the GPU table `dpo-ds bench` shares."""
from __future__ import annotations

import json

import pytest
import torch

from dpo_ds import plan as P
from dpo_ds.cli import main
from dpo_ds.plan.compute import ASSUMED_MFU_WHY

# the llama-1b preset (TinyLlama-1.1B's shape)
V, H, INTER, LAYERS, HEADS, KV_HEADS = 32000, 2048, 5632, 22, 32, 4
HEAD_DIM = H // HEADS
SEQ, PAIRS, ACCUMULATION, GPUS = 2048, 4, 2, 2


def llama_params() -> int:
    """A Llama's parameters from its widths: embeddings and an untied lm_head; per layer q, k, v, o projections
    (k and v of KV_HEADS heads), the SwiGLU MLP's three matrices and two RMSNorm weights; the final norm."""
    attention = H * HEADS * HEAD_DIM + 2 * H * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM * H
    return 2 * V * H + LAYERS * (attention + 3 * H * INTER + 2 * H) + H


def hand_flops(reference_forward: bool, lora: bool = False) -> tuple[int, float]:
    """(tokens, FLOPs) of one optimizer step of PAIRS pairs x ACCUMULATION micro-steps on each of GPUS ranks:
    2 FLOPs per parameter per token for every forward, twice that for a backward (LoRA's frozen base: input
    gradients only, the same as a forward), the checkpoint recompute a forward more; per sequence and layer the
    causal QK^T and AV matmuls take half of 2 x 2 x SEQ^2 x HEADS x HEAD_DIM forward, their backward twice
    that whatever is trained."""
    sequences = 2 * PAIRS * ACCUMULATION * GPUS
    tokens = sequences * SEQ
    forwards = 1 + 1 + (1 if reference_forward else 0)  # policy, recompute, reference
    dense = 2 * llama_params() * tokens * (forwards + (1 if lora else 2))
    attention_forward = sequences * LAYERS * (4 * SEQ**2 * HEADS * HEAD_DIM) / 2
    return tokens, dense + attention_forward * (forwards + 2)


def one_node(**kwargs) -> P.Setup:
    return P.Setup(**{"nodes": 1, "gpus_per_node": GPUS, "gpu_memory_gb": 80, "cpu_memory_gb": 1024,
                      "seq_len": SEQ, "micro_batch_size": PAIRS, "gradient_accumulation_steps": ACCUMULATION, **kwargs})


def test_step_flops_match_the_hand_count():
    shape = P.load_shape("llama-1b")
    assert shape.params == llama_params()  # the hand formula describes the preset
    for reference, live in (("offload", True), ("gpu", True), ("precomputed", False), ("none", False)):
        tokens, total = hand_flops(reference_forward=live)
        flops = P.setup_flops(shape, one_node(reference=reference))
        assert flops.tokens == tokens
        assert flops.total == pytest.approx(total, rel=1e-12), reference
    tokens, total = hand_flops(reference_forward=True, lora=True)
    assert P.setup_flops(shape, one_node(lora_r=16)).total == pytest.approx(total, rel=1e-12)
    # without checkpointing (a `dpo-ds bench` run that turns it off) one forward less
    no_recompute = P.step_flops(shape, tokens, tokens * SEQ, lora=False, recompute=False, live_reference=False)
    assert no_recompute.dense == 6 * llama_params() * tokens


def test_step_flops_of_an_moe_count_the_active_parameters_and_s_counts_each_token_once():
    shape = P.load_shape("mixtral-8x7b")
    flops = P.setup_flops(shape, one_node(reference="precomputed"))
    assert flops.dense == 8 * shape.active_params * flops.tokens and shape.active_params < shape.params / 3
    dense = P.load_shape("llama-1b")
    shared = P.setup_flops(dense, one_node(sequence_parallel_size=2))  # both GPUs share each sequence
    assert shared.total == pytest.approx(P.setup_flops(dense, one_node()).total / 2, rel=1e-12)


def test_projection_arithmetic():
    shape, gpu = P.load_shape("llama-1b"), P.GPUS["H200"]
    flops = P.setup_flops(shape, one_node())
    projected = P.Projection(flops, GPUS, gpu.peak_tflops, 0.4)
    seconds = hand_flops(reference_forward=True)[1] / (GPUS * gpu.peak_tflops * 1e12 * 0.4)
    assert projected.step_time_s == pytest.approx(seconds, rel=1e-12)
    assert projected.tokens_per_s == pytest.approx(flops.tokens / seconds, rel=1e-12)


def test_cli_prints_the_projection_and_its_assumption(capsys):
    args = ["plan", "--model", "llama-1b", "--gpus_per_node", str(GPUS), "--seq_len", str(SEQ), "--micro_batch_size",
            str(PAIRS), "--gradient_accumulation_steps", str(ACCUMULATION), "--gpu", "h200"]
    assert main(args) == 0
    text = capsys.readouterr().out
    tokens, total = hand_flops(reference_forward=True)  # plan's default reference: offloaded, so live
    peak = P.GPUS["H200"].peak_tflops
    seconds = total / (GPUS * peak * 1e12 * P.ASSUMED_MFU)
    assert f"{tokens:,} tokens x 10·N" in text
    assert f"H200, {peak:g} TFLOP/s dense bf16 per GPU: projected {seconds:.3g} s per optimizer step" in text
    assert f"assumes {P.ASSUMED_MFU:.0%} MFU: {ASSUMED_MFU_WHY}" in text
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["gpu_memory_gb"] == P.GPUS["H200"].memory_gb  # --gpu sets the memory too
    assert out["projection"]["gpu"] == "H200" and out["projection"]["step_time_s"] == pytest.approx(seconds)
    assert out["projection"]["tokens_per_s"] == pytest.approx(tokens / seconds)
    assert main([*args, "--gpu_memory_gb", "100", "--mfu", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["gpu_memory_gb"] == 100 and out["projection"]["step_time_s"] == pytest.approx(seconds * 0.4 / 0.25)
    assert main([*args, "--mfu", "0.25"]) == 0
    assert "assumes 25% MFU: given by --mfu" in capsys.readouterr().out
    assert main([*args, "--precision", "fp32"]) == 0
    assert "not projected for fp32" in capsys.readouterr().out


def test_plan_defaults_to_the_gpu_it_assumed_before():
    assert P.GPUS[P.DEFAULT_GPU].memory_gb == 80  # plan's --gpu_memory_gb default before --gpu existed
    assert {"H100", "H200", "A100", "B200"} <= set(P.GPUS)


@pytest.mark.parametrize("flag,value,message", [("--gpu", "X100", "argument --gpu: unknown GPU 'X100': one of A100"),
                                                ("--mfu", "0", "argument --mfu: must be a fraction in (0, 1], got 0"),
                                                ("--mfu", "1.5", "argument --mfu: must be a fraction")])
def test_cli_bad_gpu_or_mfu_names_the_flag(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "llama-1b", flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("device,gpu", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100-PCIe"),
                                        ("NVIDIA H200", "H200"), ("NVIDIA GH200 480GB", "GH200"),
                                        ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA B200", "B200"),
                                        ("NVIDIA A10G", "A10G"), ("NVIDIA GeForce RTX 4090", None)])
def test_device_names_find_their_table_entry(device, gpu):
    found = P.gpu_of_device(device)
    assert (found and found.name) == gpu


def test_bench_takes_its_peak_from_plans_table(monkeypatch):
    from dpo_ds.bench import _peak_tflops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    assert _peak_tflops(None) == P.GPUS["H200"].peak_tflops
    assert _peak_tflops(123.0) == 123.0
