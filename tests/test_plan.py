"""`dpo-ds plan`: exact parameter counts, DeepSpeed's own ZeRO-3 estimator, published fit points, the CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from dpo_ds import plan as P
from dpo_ds.plan import memory as M
from dpo_ds.cli import main
from dpo_ds.families import SUPPORTED_FAMILIES

NODE = dict(gpus_per_node=8, gpu_memory_gb=80, cpu_memory_gb=P.DEFAULT_CPU_MEMORY_GB)


def setup(nodes=1, seq_len=4096, micro_batch_size=1, **kwargs) -> P.Setup:
    """8x80 GB nodes with the default host memory, unless overridden."""
    return P.Setup(**{**NODE, "nodes": nodes, "seq_len": seq_len, "micro_batch_size": micro_batch_size, **kwargs})


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------ parameter counts
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)
FAMILY_SIZES = {  # families whose configs name their sizes differently
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, **SMALL),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "phi3": dict(SMALL, vocab_size=32064),  # its default pad and eos ids (32000) must be in the vocabulary
}


@pytest.mark.parametrize("config", [
    *[pytest.param(build, id=name) for name, build in P.PRESETS.items()],
    pytest.param(lambda: AutoConfig.for_model("llama", attention_bias=True, mlp_bias=True, **SMALL), id="llama-bias"),
    pytest.param(lambda: AutoConfig.for_model("llama", tie_word_embeddings=True, **SMALL), id="llama-tied"),
    pytest.param(lambda: AutoConfig.for_model("mistral", head_dim=24, **SMALL), id="mistral-head_dim"),
    pytest.param(lambda: AutoConfig.for_model("qwen2", **SMALL), id="qwen2"),
    pytest.param(lambda: AutoConfig.for_model("qwen3", **SMALL), id="qwen3"),
    pytest.param(lambda: AutoConfig.for_model("mixtral", num_local_experts=4, num_experts_per_tok=2, **SMALL),
                 id="mixtral-small"),
    pytest.param(lambda: AutoConfig.for_model("qwen3_moe", num_experts=8, num_experts_per_tok=2,
                                              moe_intermediate_size=40, **SMALL), id="qwen3_moe-small"),
])
def test_param_count_and_largest_module_match_the_built_model(config):
    config = config()
    model = meta_model(config)
    shape = P.shape_from_config(config, "m")
    assert shape.params == sum(p.numel() for p in model.parameters())
    # DeepSpeed's largest_layer_params: parameters a single module owns directly (stage3.model_to_params).
    assert shape.largest_module_params == max(sum(p.numel() for p in m.parameters(recurse=False))
                                              for m in model.modules())


def test_preset_sizes_are_the_published_ones():
    published = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-70b": 68_976_648_192,
                 "llama3-8b": 8_030_261_248, "mixtral-8x7b": 46_702_792_704,
                 "llama-1b": 1_100_048_384}  # TinyLlama-1.1B's shape
    assert {name: P.load_shape(name).params for name in published} == published
    # llama-60m is our own small benchmark shape: its count is checked against the meta-device model above
    assert set(P.PRESETS) == set(published) | {"llama-60m"}
    mixtral = P.load_shape("mixtral-8x7b")
    assert 12.8e9 < mixtral.active_params < 13.0e9  # "12.9B active parameters" (Mixtral of Experts, 2024)


@pytest.mark.parametrize("model_type,experts", [("mixtral", {"num_local_experts": 8}),
                                                ("qwen3_moe", {"num_experts": 8, "moe_intermediate_size": 40})])
def test_moe_active_params_count_only_the_routed_experts(model_type, experts):
    """FLOPs use the parameters a token passes through: of the built model's expert tensors, 2 of 8 experts."""
    config = AutoConfig.for_model(model_type, num_experts_per_tok=2, **experts, **SMALL)
    expert_params = sum(p.numel() for name, p in meta_model(config).named_parameters() if ".experts." in name)
    shape = P.shape_from_config(config, "m")
    assert shape.active_params == shape.params - expert_params * 6 // 8


def test_moe_with_dense_layers_counts_each_layer_as_built():
    """Qwen3-MoE with a dense first layer: the count is the built model's, and only the sparse layers' experts are
    left out of the active parameters."""
    config = AutoConfig.for_model("qwen3_moe", num_experts=4, num_experts_per_tok=1, mlp_only_layers=[0],
                                  moe_intermediate_size=40, **SMALL)
    model = meta_model(config)
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    shape = P.shape_from_config(config, "m")
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.active_params == shape.params - expert_params * 3 // 4


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_FAMILIES))
def test_every_tested_family_is_counted_as_built(model_type):
    """Every family dpo-ds trains has a plan: parameters, LoRA adapter size and the log-probs path as the trainer
    takes them (scored inside lm_head where dpo_ds.scoring.fused_head says so, full logits otherwise)."""
    from dpo_ds.scoring import fused_head

    config = AutoConfig.for_model(model_type, **FAMILY_SIZES.get(model_type, SMALL))
    model = meta_model(config)
    shape = P.shape_from_config(config, "m")
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.fused_head == (fused_head(model) is not None)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if m is not head and type(m).__name__ in ("Linear", "Conv1D")]
    assert shape.lora_params(8) == 8 * sum(m.weight.shape[0] + m.weight.shape[1] for m in linear)
    result = P.plan(shape, setup())
    logits = "logits + chunked fp32 log-softmax" in {item.name for item in result.items}
    assert logits == (not shape.fused_head)


# ------------------------------------------------------------------ DeepSpeed's ZeRO-3 estimator
# estimate_zero3_model_states_mem_needs budgets per parameter: 2 B bf16 params + 16 B "optimizer states"
# = fp32 gradient (4) + fp32 master (4) + Adam m, v (8), plus 4 B x largest layer gathered on GPU, and an
# additional_buffer_factor (1.5) on the CPU side. DeepSpeed 0.19's stage3.py holds one more buffer it does
# not count: the gradient partition reduce-scatter writes into, in grad_accum_dtype (= bf16, 2 B/param,
# `grad_partitions_flat_buffer`), on the optimizer's device; the fp32 copy is made from it for the step.
# So with additional_buffer_factor=1, our model states == the estimator's + that bf16 gradient partition,
# exactly (up to the estimator's int truncation), in each placement. Without offload the fp32 gradient is
# one sub-group buffer (<= sub_group_size elements), so the shard must be <= sub_group_size for the
# estimator's full 4 B/param to match; the configurations below satisfy that.
@pytest.mark.parametrize("name,nodes", [("llama-7b", 1), ("llama-70b", 16), ("mixtral-8x7b", 8)])
@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_model_states_agree_with_deepspeed_estimator(name, nodes, offload_optimizer, offload_params):
    shape = P.load_shape(name)
    result = P.plan(shape, setup(nodes, offload_optimizer=offload_optimizer, offload_params=offload_params))
    assert shape.params / result.setup.total_gpus <= P.SUB_GROUP
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=shape.params, largest_layer_params=shape.largest_module_params,
        num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_params,
        zero_init=True, additional_buffer_factor=1.0)
    ours, grads = result.policy_states, result.item(M.POLICY_GRADS)

    assert ours.gpu_bytes - grads.gpu_bytes == pytest.approx(ds_gpu, abs=1)
    # the documented difference is small: at most 2 of the estimator's 18 B/param
    assert ds_gpu <= ours.gpu_bytes <= ds_gpu * (1 + 2 / 16)
    if offload_optimizer:  # without offload the estimator's CPU figure is the zero.Init gather, not a state
        assert ours.cpu_bytes_per_node - grads.cpu_bytes_per_node == pytest.approx(ds_cpu, abs=1)
        assert ds_cpu <= ours.cpu_bytes_per_node <= ds_cpu * (1 + 2 / 16)
    else:
        assert ours.cpu_bytes_per_node == 0


def test_sixteen_bytes_per_param_without_offload():
    """bf16 params 2 + bf16 grads 2 + fp32 master, m, v 12 = 16 B/param over all GPUs (the ZeRO paper's 16Psi)."""
    shape = P.load_shape("llama-70b")
    result = P.plan(shape, setup(4))
    sixteen = sum(result.item(n).gpu_bytes for n in (M.POLICY_PARAMS, M.POLICY_GRADS, M.POLICY_OPTIMIZER))
    assert sixteen == pytest.approx(16 * shape.params / 32)


# ---------------------------------------------------------------------------- published points
def test_llama_70b_needs_four_nodes_without_offload():
    shape = P.load_shape("llama-70b")
    for seq_len in (2048, 4096):
        fits = {n: P.plan(shape, setup(n, seq_len, reference="offload")).fits for n in (1, 2, 4)}
        assert fits == {1: False, 2: False, 4: True}, seq_len
        # the machines given first: one node with the optimizer offloaded, before four nodes without offload
        found = P.smallest_fit(shape, setup(1, seq_len, reference="offload"))
        assert (found.setup.nodes, found.setup.offload_optimizer, found.setup.offload_params) == (1, True, False)
        found = P.smallest_fit(shape, setup(1, seq_len, reference="offload", cpu_memory_gb=256))
        assert (found.setup.nodes, found.setup.offload_optimizer, found.setup.offload_params) == (4, False, False)


def test_llama_70b_fits_one_node_with_full_offload_given_the_host_memory():
    shape = P.load_shape("llama-70b")
    offloaded = setup(1, reference="offload", offload_optimizer=True, offload_params=True)
    result = P.plan(shape, offloaded)
    assert result.fits
    assert result.cpu_bytes_per_node > 1.0 * 2**40  # ~20 B/param of host memory: a 1 TB host is too small
    assert not P.plan(shape, dataclasses.replace(offloaded, cpu_memory_gb=1024)).fits
    # optimizer offload alone leaves 2 B/param / 8 GPUs = 16 GiB of bf16 params per GPU: that fits too
    assert P.plan(shape, dataclasses.replace(offloaded, offload_params=False)).fits


@pytest.mark.parametrize("name", ["llama-7b", "llama3-8b"])
def test_seven_to_eight_b_fits_one_node_without_offload(name):
    for reference in P.REFERENCE_MODES:
        assert P.plan(P.load_shape(name), setup(1, reference=reference)).fits, reference


def test_reference_placement_and_flops():
    shape = P.load_shape("llama-7b")
    by_mode = {mode: P.plan(shape, setup(1, reference=mode)) for mode in P.REFERENCE_MODES}
    assert by_mode["gpu"].gpu_bytes > by_mode["offload"].gpu_bytes > by_mode["precomputed"].gpu_bytes
    assert by_mode["offload"].cpu_bytes_per_node == pytest.approx(2 * shape.params)  # bf16 shards of 8 ranks
    assert by_mode["precomputed"].gpu_bytes == by_mode["none"].gpu_bytes
    # FLOPs: policy 6N + checkpoint recompute 2N, + 2N for a live reference's forward (tests/test_plan_compute.py)
    flops = {mode: P.setup_flops(shape, setup(1, reference=mode)) for mode in P.REFERENCE_MODES}
    tokens = 2 * 1 * 4096 * 8
    assert flops["gpu"] == flops["offload"] and flops["precomputed"] == flops["none"]
    assert flops["gpu"].tokens == tokens
    assert flops["gpu"].dense == 10 * shape.params * tokens
    assert flops["precomputed"].dense == 8 * shape.params * tokens


def test_smallest_fit_halves_the_micro_batch_last():
    """Activations are per GPU: no node count or offload helps, so the search ends up halving the micro batch."""
    shape = P.load_shape("llama-7b")
    too_big = setup(1, micro_batch_size=64)
    assert not P.plan(shape, too_big).fits
    found = P.smallest_fit(shape, too_big)
    assert found.fits and found.setup.micro_batch_size < 64
    twice = dataclasses.replace(found.setup, micro_batch_size=2 * found.setup.micro_batch_size)
    assert not P.plan(shape, dataclasses.replace(twice, nodes=64, offload_optimizer=True, offload_params=True)).fits
    assert P.smallest_fit(shape, setup(1, micro_batch_size=64, gpu_memory_gb=4)) is None


# ---------------------------------------------------------------------------------------- CLI
def test_cli_json(capsys):
    assert main(["plan", "--model", "llama-7b", "--nodes", "1", "--gpus_per_node", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["params"] == 6_738_415_616
    assert out["setup"]["total_gpus"] == 8
    assert out["fits"] is True and out["smallest_fit"]["nodes"] == 1
    assert {"policy params", "reference params", "activation checkpoints"} <= set(out["memory_gib"])
    assert out["gpu_gib_per_gpu"] < out["gpu_budget_gib"]
    assert out["flops"]["total"] > out["flops"]["dense"] > 0


def test_cli_text_from_config_json(tmp_path, capsys):
    LlamaConfig(**SMALL).save_pretrained(tmp_path)
    for model in (tmp_path / "config.json", tmp_path):
        assert main(["plan", "--model", str(model), "--seq_len", "128"]) == 0
        out = capsys.readouterr().out
        expected = P.shape_from_config(LlamaConfig(**SMALL), "x").params
        assert f"N = {expected:,} params" in out and "fits      yes" in out


def test_cli_unknown_preset_lists_presets():
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "llama-999b"])
    assert "llama-999b" in str(exit_info.value) and all(name in str(exit_info.value) for name in P.PRESETS)


def test_fused_log_probs_budget_less_than_full_logits():
    model = P.load_shape("llama3-8b")
    fused, full = (P.plan(model, setup(1, fused_lm_head=flag)) for flag in (True, False))
    item = {i.name: i.gpu_bytes for i in fused.items}["log-probs in lm_head (fused, chunked)"]
    assert item < {i.name: i.gpu_bytes for i in full.items}["logits + chunked fp32 log-softmax"] / 4


def test_plan_answers_for_the_machines_given_with_train_flags(capsys):
    """Issue 13 item 11: for llama3-8b on one 24 GB GPU, plan defaulted to a GPU-resident reference (train offloads
    it), answered `16 node(s) x 1 GPUs` before trying offload on the machine given, and printed no flags."""
    args = ["plan", "--model", "llama3-8b", "--nodes", "1", "--gpus_per_node", "1", "--gpu_memory_gb", "24"]
    assert main([*args, "--cpu_memory_gb", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["reference"] == "offload"
    assert out["smallest_fit"]["nodes"] == 1 and out["smallest_fit"]["offload_params"]
    assert out["smallest_fit"]["train_flags"] == ["--micro_batch_size", "1", "--max_length", "4096", "--precision",
                                                  "bf16", "--deepspeed_config", "ds_configs/zero3_offload_all.json"]
    assert main([*args, "--cpu_memory_gb", "64"]) == 0  # too little host memory for the offloaded optimizer
    text = capsys.readouterr().out
    assert "not on 1 node(s) with any offload or micro batch; needs more nodes" in text
    assert "dpo-ds train --micro_batch_size 1 --max_length 4096 --precision bf16 --deepspeed_config" in text
    assert "16 node(s)" not in text


# ---------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("qwen2", {}),
                                              ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2))])
def test_lora_params_match_the_models_linear_layers(model_type, extra):
    """r x (in + out) for every nn.Linear but lm_head (MoE experts are fused parameters, not Linear)."""
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    model = meta_model(config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert P.shape_from_config(config, "m").lora_params(8) == sum(8 * (m.in_features + m.out_features) for m in linear)
    # what QLoRA quantizes: those layers' weights
    assert P.shape_from_config(config, "m").linear_weight_params == sum(m.weight.numel() for m in linear)


def test_llama_70b_lora_fits_one_node_of_eight_80gb_gpus():
    shape = P.load_shape("llama-70b")
    full = P.plan(shape, setup(1, reference="offload"))
    lora = P.plan(shape, setup(1, lora_r=16))
    assert not full.fits and lora.fits
    assert lora.cpu_bytes_per_node == 0  # nothing offloaded, no reference model anywhere
    assert lora.item(M.POLICY_PARAMS).gpu_bytes == pytest.approx(2 * (shape.params + shape.lora_params(16)) / 8)
    # grads, fp32 master and Adam for the adapter only: 2 + 4 + 8 B per adapter param
    states = sum(lora.item(n).gpu_bytes for n in (M.POLICY_GRADS, M.POLICY_OPTIMIZER))
    assert states == pytest.approx(14 * shape.lora_params(16) / 8)
    assert not any(item.name.startswith("reference") for item in lora.items)
    # frozen base: no weight gradients, so 2N forward + 2N backward, + 2N recompute, + 2N for the reference forward
    flops = P.setup_flops(shape, setup(1, lora_r=16))
    assert flops.dense == 8 * shape.params * flops.tokens


def test_llama_70b_qlora_budgets_the_4bit_base_and_fits_one_80gb_gpu():
    shape = P.load_shape("llama-70b")
    one_gpu = P.plan(shape, setup(1, gpus_per_node=1, lora_r=16, lora_quantize="nf4"))
    assert one_gpu.fits and not P.plan(shape, setup(1, gpus_per_node=1, lora_r=16)).fits
    quantized, rest, adapter = shape.linear_weight_params, shape.params - shape.linear_weight_params, shape.lora_params(16)
    constants = quantized * (1 / 64 + 4 / (64 * 256))  # double quantization: 8-bit absmax / 64, fp32 / 256 absmax
    assert one_gpu.item(M.POLICY_PARAMS).gpu_bytes == pytest.approx(0.5 * quantized + 2 * rest + 2 * adapter)
    assert one_gpu.item(M.NF4_CONSTANTS).gpu_bytes == pytest.approx(constants)
    assert one_gpu.load_gpu_bytes == pytest.approx(0.5 * quantized + 2 * rest + constants)
    # on 8 GPUs ZeRO-3 shards the packed weights, not the constants; FLOPs are LoRA's
    eight = P.plan(shape, setup(1, lora_r=16, lora_quantize="nf4"))
    assert eight.item(M.POLICY_PARAMS).gpu_bytes == pytest.approx(one_gpu.item(M.POLICY_PARAMS).gpu_bytes / 8)
    assert eight.item(M.NF4_CONSTANTS).gpu_bytes == pytest.approx(constants)
    assert P.setup_flops(shape, eight.setup) == P.setup_flops(shape, setup(1, lora_r=16))


def test_cli_qlora(capsys):
    assert main(["plan", "--model", "llama-70b", "--gpus_per_node", "1", "--lora_r", "16", "--lora_quantize", "nf4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["load_gpu_gib_per_gpu"] > 30 and M.NF4_CONSTANTS in out["memory_gib"]
    assert out["smallest_fit"]["train_flags"][-4:] == ["--lora_r", "16", "--lora_quantize", "nf4"]
    with pytest.raises(SystemExit, match="give --lora_r too"):
        main(["plan", "--model", "llama-70b", "--lora_quantize", "nf4"])


def test_cli_lora(capsys):
    assert main(["plan", "--model", "llama-70b", "--lora_r", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["setup"]["lora_r"] == 16 and out["lora_params"] == P.load_shape("llama-70b").lora_params(16)
    assert out["smallest_fit"]["train_flags"][-2:] == ["--lora_r", "16"]


# --- sequence parallelism (Ulysses) --------------------------------------------------------------------------------
def test_sequence_parallelism_divides_the_activations_and_adds_one_layers_all_to_all():
    model = P.load_shape("llama3-8b")
    alone, shared = (M.plan(model, setup(seq_len=65536, sequence_parallel_size=s)) for s in (1, 8))
    for name in ("activation checkpoints", "layer recompute + its grads"):
        assert shared.item(name).gpu_bytes == alone.item(name).gpu_bytes / 8
    # the model states do not depend on S: ZeRO-3 partitions over all GPUs
    assert shared.policy_states == alone.policy_states
    exchange = shared.item("Ulysses all-to-all buffers (one layer)").gpu_bytes
    assert exchange == 2 * (2 * model.q_dim + 2 * model.kv_dim) * (2 * 65536 // 8) * 2
    assert all(item.name != "Ulysses all-to-all buffers (one layer)" for item in alone.items)
    # a micro-step on all GPUs: 8 data-parallel groups of one pair each, or one group of 8 sharing its pair
    shared_flops, alone_flops = (P.setup_flops(model, result.setup) for result in (shared, alone))
    assert shared_flops.tokens == alone_flops.tokens / 8 and shared_flops.total == alone_flops.total / 8


def test_issue_21_targets_long_responses_fit_with_sequence_parallelism():
    """Llama-3-8B with 64k-token responses (+ a 1k prompt) on one node of 8 x 80 GB; Llama-70B with 32k-token
    responses on 4 such nodes; neither without sequence parallelism."""
    for name, nodes, seq_len in (("llama3-8b", 1, 66560), ("llama-70b", 4, 33792)):
        model = P.load_shape(name)
        assert M.plan(model, setup(nodes=nodes, seq_len=seq_len, sequence_parallel_size=8, reference="offload")).fits
        assert not M.plan(model, setup(nodes=nodes, seq_len=seq_len, reference="offload")).fits_gpu


def test_longest_seq_len_is_the_boundary_of_fitting():
    model = P.load_shape("llama3-8b")
    for size in (1, 8):
        given = setup(seq_len=4096, sequence_parallel_size=size, reference="offload")
        longest = P.longest_seq_len(model, given)
        assert longest % size == 0
        assert M.plan(model, dataclasses.replace(given, seq_len=longest)).fits
        assert not M.plan(model, dataclasses.replace(given, seq_len=longest + size)).fits
    longest_alone = P.longest_seq_len(model, setup(reference="offload"))
    assert P.longest_seq_len(model, setup(reference="offload", sequence_parallel_size=8)) > 6 * longest_alone


def test_cli_sequence_parallel(capsys):
    assert main(["plan", "--model", "llama3-8b", "--seq_len", "66560", "--sequence_parallel_size", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["setup"]["sequence_parallel_size"] == 8
    assert out["longest_seq_len"] >= 66560
    flags = out["smallest_fit"]["train_flags"]
    assert flags[flags.index("--sequence_parallel_size") + 1] == "8"
    with pytest.raises(SystemExit, match="must divide the 8 GPUs and the model's 32 attention heads"):
        main(["plan", "--model", "llama3-8b", "--sequence_parallel_size", "3"])
