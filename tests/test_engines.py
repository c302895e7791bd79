"""dpo_ds/engines: DeepSpeed config filling, model preparation (dropout, expert leaves), the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from dpo_ds.config import ConfigError, TrainConfig
from dpo_ds.engines import disable_dropout, mark_expert_blocks, resolve_policy_config, resolve_reference_config
from dpo_ds.engines.lifecycle import lr_scheduler
from helpers import tiny_causal_lm

HIDDEN = 48
CFG = dict(micro_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.7, precision="bf16", learning_rate=2e-5,
           adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.01, zero_stage="3")


def ds_json(tmp_path, config: dict, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def values(node, prefix=""):
    """Every leaf of a nested dict as 'a.b.c' -> value."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, child in node.items() for k, v in values(child, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("world", [1, 4])
def test_policy_preset_is_filled_from_the_run_config(world):
    ds = resolve_policy_config(TrainConfig(**CFG), world, HIDDEN)  # the CPU preset: every value "auto"
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * world
    assert ds["gradient_clipping"] == 0.7 and ds["bf16"]["enabled"] is True
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (2e-5, [0.8, 0.95], 1e-7, 0.01)
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]
            ) == (48 * 48, 2073, 480)
    assert "auto" not in values(ds).values()


def test_policy_explicit_values_win_and_missing_ones_are_filled(tmp_path):
    source = ds_json(tmp_path, {"gradient_clipping": 0.25, "bf16": {"enabled": False},
                                "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "eps": "auto"}},
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}})
    ds = resolve_policy_config(TrainConfig(deepspeed_config=source, **CFG), 2, HIDDEN)
    assert ds["gradient_clipping"] == 0.25 and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "eps": 1e-7, "betas": [0.8, 0.95], "weight_decay": 0.01}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 480
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 5, 30)
    fp32 = resolve_policy_config(TrainConfig(deepspeed_config=ds_json(tmp_path, {"zero_optimization": {"stage": 3}}),
                                             precision="fp32"), 1, HIDDEN)
    assert fp32["bf16"]["enabled"] is False and fp32["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("config,message", [
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "'zero_optimization.sub_group_size' is \"auto\""),
    ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 2}}, "field 'zero_stage': 3 but .* sets zero_optimization.stage 2"),
    ({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}, None),  # refused below: zero_stage 3
    ({}, None),  # no zero_optimization block at all: zero_stage's stage is written in
])
def test_policy_config_refusals_name_the_file(tmp_path, config, message):
    source = ds_json(tmp_path, config)
    cfg = TrainConfig(deepspeed_config=source, zero_stage="3")
    if config.get("zero_optimization", {}).get("stage") == 1:
        cfg = TrainConfig(deepspeed_config=source)
        message = "offload_param needs ZeRO stage 3"
    if message is None:
        assert resolve_policy_config(cfg, 1, HIDDEN)["zero_optimization"]["stage"] == 3
        return
    with pytest.raises(ConfigError, match=message) as err:
        resolve_policy_config(cfg, 1, HIDDEN)
    assert source in str(err.value)


def test_unreadable_json_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "gradient_clipping": 1.0,\n  oops\n}')
    with pytest.raises(ConfigError, match=rf"{path}:3: invalid JSON.*deepspeed_config"):
        resolve_policy_config(TrainConfig(deepspeed_config=str(path)), 1, HIDDEN)
    with pytest.raises(ConfigError, match=r"field 'ref_deepspeed_config'.*not found"):
        resolve_reference_config(TrainConfig(ref_deepspeed_config=str(tmp_path / "none.json")), HIDDEN)


@pytest.mark.parametrize("ref_offload,device", [(True, "cpu"), (False, "none")])
def test_reference_config(ref_offload, device):
    ds = resolve_reference_config(TrainConfig(micro_batch_size=4, precision="fp32", ref_offload=ref_offload), HIDDEN)
    assert "optimizer" not in ds and "train_batch_size" not in ds  # DeepSpeed derives the batch itself
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] is False
    offload = ds["zero_optimization"]["offload_param"]
    assert offload["device"] == device and offload["pin_memory"] is False  # no pinned memory on the CPU
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 480
    assert "auto" not in values(ds).values()


def test_reference_config_refuses_an_optimizer(tmp_path):
    source = ds_json(tmp_path, {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="no 'optimizer' block") as err:
        resolve_reference_config(TrainConfig(ref_deepspeed_config=source), HIDDEN)
    assert source in str(err.value)


@pytest.mark.parametrize("model_type,rates", [
    ("gpt2", dict(resid_pdrop=0.1, embd_pdrop=0.2, attn_pdrop=0.3, summary_first_dropout=0.4)),
    ("llama", dict(attention_dropout=0.25)),
])
def test_disable_dropout(model_type, rates):
    sizes = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=40) if model_type == "gpt2" else {}
    model = tiny_causal_lm(model_type, **sizes, **rates).train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert model_type == "llama" or any(m.p > 0 for m in dropouts)
    overrides = disable_dropout(model)
    assert sorted(overrides) == sorted(("", name, value) for name, value in rates.items())
    assert all(getattr(model.config, name) == 0 for name in rates)
    assert all(m.p == 0 for m in dropouts)
    # rates copied onto modules (LlamaAttention.attention_dropout) are zero too
    assert all(getattr(m, name) == 0 for m in model.modules() for name in rates if hasattr(m, name))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # train mode, deterministic
    assert disable_dropout(model) == []  # nothing left to change


def test_mark_expert_blocks():
    from deepspeed.utils import z3_leaf_module

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(Block(), Dense(), Block())
    assert mark_expert_blocks(model) == 1  # one class of block
    assert [z3_leaf_module(m) for m in model] == [True, False, True]
    assert not any(z3_leaf_module(m) for m in model[0].experts)
    assert mark_expert_blocks(tiny_causal_lm("qwen3_moe")) == 0  # transformers' fused experts: nothing to mark


def plain_rate(schedule: str, step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return {"constant": 1.0, "linear": max(0.0, 1 - progress),
            "cosine": max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))}[schedule]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_rates(schedule, warmup):
    peak, total = 0.4, 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=peak)
    scheduler = lr_scheduler(schedule, warmup, total)(optimizer)
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([peak * plain_rate(schedule, s, warmup, total) for s in range(total + 1)],
                                  abs=1e-12)
    assert rates[warmup] == pytest.approx(peak)
    if schedule != "constant":
        assert rates[total] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("schedule, name", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                            ("cosine", "cosine")])
@pytest.mark.parametrize("warmup, total", [(0, 7), (3, 10), (5, 5)])
def test_lr_schedules_are_transformers_own(schedule, name, warmup, total):
    # dpo-ds writes transformers' schedules out (importing them costs every rank peft and bitsandbytes): the
    # same rates, bit for bit, and the same scheduler state, at every step and past the end
    from transformers import get_scheduler

    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.3) for _ in range(2))
    mine = lr_scheduler(schedule, warmup, total)(ours)
    reference = get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 3):
        assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
        ours.step(), theirs.step(), mine.step(), reference.step()
    assert mine.state_dict() == reference.state_dict()


def test_reference_beside_a_whole_model_policy_is_whole_too():
    cfg = TrainConfig(micro_batch_size=4, precision="fp32", ref_offload=True)
    for stage in (0, 1, 2):
        zero = resolve_reference_config(cfg, HIDDEN, policy_stage=stage)["zero_optimization"]
        assert zero["stage"] == 0 and "offload_param" not in zero  # no partitions, nothing to offload
    assert resolve_reference_config(cfg, HIDDEN, policy_stage=3)["zero_optimization"]["stage"] == 3


@pytest.fixture
def model_dir(tmp_path):
    from transformers import AutoConfig

    from helpers import TINY_SIZES

    AutoConfig.for_model("llama", **TINY_SIZES).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.fixture
def rank_memory(monkeypatch):
    """Set what one rank may fill (sizing's budget is this less plan's headroom); plan's answers are cached per size."""
    from dpo_ds.engines import sizing
    from dpo_ds.plan.memory import HEADROOM

    def set_budget(budget: float) -> None:
        monkeypatch.setattr(sizing, "rank_memory_bytes", lambda: (budget / (1 - HEADROOM), "a test device"))
    yield set_budget
    sizing._replicated_bytes.cache_clear()


def _plan_need(model_dir, world, stage, checkpointing=True):
    from dpo_ds.families import load_model_config
    from dpo_ds.plan.memory import Setup, replicated_bytes
    from dpo_ds.plan.shapes import shape_from_config

    shape = shape_from_config(load_model_config(model_dir), model_dir)
    setup = Setup(nodes=1, gpus_per_node=world, gpu_memory_gb=1, cpu_memory_gb=0, seq_len=64, micro_batch_size=2,
                  precision="bf16", reference="gpu", gradient_checkpointing=checkpointing)
    return shape, replicated_bytes(shape, setup, stage)


def test_zero_stage_auto_picks_the_lowest_stage_that_fits(model_dir, rank_memory):
    from dpo_ds.engines import sizing

    cfg = TrainConfig(model_name_or_path=model_dir, precision="bf16", micro_batch_size=2, max_length=64)
    world = 4
    shape, _ = _plan_need(model_dir, world, 0)
    need = [_plan_need(model_dir, world, s)[1] for s in (0, 1, 2)]
    assert need[0] > need[1] > need[2]  # each stage partitions more
    # by hand: bf16 params (2) + grads (2, /world from stage 2) + fp32 master, Adam m, v, fp32 grads (16, /world
    # from stage 1) + the reference's bf16 copy (2) per parameter; the activations are the same at every stage
    n = shape.params
    assert need[0] - need[1] == pytest.approx(16 * n * (1 - 1 / world))
    assert need[1] - need[2] == pytest.approx(2 * n * (1 - 1 / world))
    activations = need[0] - (2 + 2 + 16 + 2) * n
    assert activations > 0
    for budget, want in [(need[0], 0), ((need[0] + need[1]) / 2, 1), ((need[1] + need[2]) / 2, 2), (need[2] / 2, 3)]:
        rank_memory(budget)
        ds = resolve_policy_config(cfg, world, HIDDEN)
        assert ds["zero_optimization"]["stage"] == want
        reason = sizing.stage_reason(cfg, ds)
        assert ("stage 2 needs" in reason) if want == 3 else (f"fits one rank at stage {want}" in reason)


def test_gradient_checkpointing_auto_is_off_only_where_a_whole_steps_activations_fit(model_dir, rank_memory):
    from dpo_ds.engines.sizing import checkpointing_choice

    world = 2
    shape, with_recompute = _plan_need(model_dir, world, 0)
    _, without = _plan_need(model_dir, world, 0, checkpointing=False)
    # by hand: without the recompute every layer keeps what it saves for backward (plus one layer's gradients);
    # with it each layer keeps its input (h values a token) and one layer is recomputed with its gradients
    tokens, p, layer = 2 * 2 * 64, 2, shape.layer_activation_bytes_per_token(2)
    assert without - with_recompute == pytest.approx(
        (shape.num_layers + 1) * tokens * layer - (shape.num_layers * tokens * shape.hidden_size * p + 2 * tokens * layer))
    assert without > with_recompute
    cfg = TrainConfig(model_name_or_path=model_dir, precision="bf16", micro_batch_size=2, max_length=64)
    rank_memory(without)
    choice = checkpointing_choice(cfg, 0, world, "sdpa")
    assert not choice.on and "fit without the recompute" in choice.reason
    rank_memory(without * 0.99)
    choice = checkpointing_choice(cfg, 0, world, "sdpa")
    assert choice.on and "without the recompute a step needs" in choice.reason
    rank_memory(without * 100)
    assert checkpointing_choice(cfg, 3, world, "sdpa").on  # ZeRO-3: the model is partitioned, keep the recompute
    for setting, on in [("true", True), ("false", False), (True, True)]:  # explicit (and a bool built in code)
        choice = checkpointing_choice(dataclasses.replace(cfg, gradient_checkpointing=setting), 0, world, "sdpa")
        assert choice.on is on and choice.reason == "set by gradient_checkpointing"
    assert not checkpointing_choice(dataclasses.replace(cfg, gradient_checkpointing="false"), 3, world, "sdpa").on
    # eager attention keeps [T, T] scores plan does not count: auto keeps the recompute wherever memory would allow
    choice = checkpointing_choice(cfg, 0, world, "eager")
    assert choice.on and "eager attention" in choice.reason


def test_zero_stage_auto_sizes_an_explicit_no_recompute_with_all_activations(model_dir, rank_memory):
    """gradient_checkpointing false: the stage auto picks must hold every layer's activations, not one layer's."""
    world = 2
    cfg = TrainConfig(model_name_or_path=model_dir, precision="bf16", micro_batch_size=2, max_length=64)
    with_recompute = [_plan_need(model_dir, world, s)[1] for s in (0, 1, 2)]
    rank_memory(with_recompute[0])  # stage 0 fits only with the recompute
    assert resolve_policy_config(cfg, world, HIDDEN)["zero_optimization"]["stage"] == 0
    no_recompute = dataclasses.replace(cfg, gradient_checkpointing="false")
    assert resolve_policy_config(no_recompute, world, HIDDEN)["zero_optimization"]["stage"] > 0


def test_rank_memory_on_cpu_is_its_share_of_the_host_or_cgroup_limit(tmp_path, monkeypatch):
    from dpo_ds.engines import sizing

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    (tmp_path / "unlimited").write_text("max\n")
    (tmp_path / "job").write_text(f"{physical // 4}\n")
    monkeypatch.setattr(sizing, "_cgroup_limit_files", lambda: [tmp_path / "unlimited", tmp_path / "gone", tmp_path / "job"])
    assert sizing.host_memory_bytes() == physical // 4  # a Slurm job's --mem below the host's memory wins
    monkeypatch.setattr(sizing, "_cgroup_limit_files", lambda: [tmp_path / "unlimited"])
    assert sizing.host_memory_bytes() == physical
    monkeypatch.setattr(sizing, "on_cpu", lambda: True)
    monkeypatch.setattr(sizing.comm, "local_world_size", lambda: 4)
    assert sizing.rank_memory_bytes() == (physical / 4, "this host's memory, shared by 4 ranks")


def test_zero_stage_lora_keeps_3_and_refuses_lower(model_dir):
    lora = TrainConfig(model_name_or_path=model_dir, lora_r=4)
    assert resolve_policy_config(lora, 1, HIDDEN)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="field 'zero_stage': LoRA and QLoRA runs need ZeRO stage 3"):
        resolve_policy_config(TrainConfig(model_name_or_path=model_dir, lora_r=4, zero_stage="0"), 1, HIDDEN)


def test_zero_stage_sequence_parallel_keeps_3_and_refuses_lower(model_dir, rank_memory):
    """The Ulysses gradient scaling (dpo_ds/sequence_parallel.py, "Gradients") is ZeRO-3's: auto keeps stage 3 even
    where a lower stage would fit the GPU, and a lower explicit stage is refused."""
    from dpo_ds.engines import sizing

    rank_memory(1e15)
    plain = TrainConfig(model_name_or_path=model_dir, precision="bf16")
    assert resolve_policy_config(plain, 2, HIDDEN)["zero_optimization"]["stage"] == 0  # it would fit at stage 0
    sp = TrainConfig(model_name_or_path=model_dir, precision="bf16", sequence_parallel_size=2)
    ds = resolve_policy_config(sp, 1, HIDDEN)
    assert ds["zero_optimization"]["stage"] == 3 and "sequence parallelism" in sizing.stage_reason(sp, ds)
    with pytest.raises(ConfigError, match="field 'zero_stage': sequence_parallel_size 2 is built and tested on ZeRO "
                                          "stage 3 only"):
        resolve_policy_config(TrainConfig(model_name_or_path=model_dir, sequence_parallel_size=2, zero_stage="2"),
                              1, HIDDEN)


@pytest.mark.parametrize("value,want", [(2, "2"), ("0", "0"), ("auto", "auto")])
def test_zero_stage_field_takes_yaml_integers(value, want):
    from dpo_ds.config import coerce

    assert coerce("zero_stage", value) == want
    with pytest.raises(ConfigError, match="field 'zero_stage'"):
        coerce("zero_stage", 4)


def test_cpu_device_count_runs_numactl_once(monkeypatch):
    """DeepSpeed's CPU accelerator would run numactl on every device_count() (per gradient bucket, per step)."""
    import deepspeed.utils.numa as numa
    from deepspeed.accelerator import get_accelerator

    from dpo_ds.engines.accelerator import count_cpu_devices_once

    accelerator = get_accelerator()
    before = vars(accelerator).pop("device_count", None)  # the class's own method again
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(numa, "get_numa_cores", lambda: calls.append(1) or [[0, 1]])
    try:
        count_cpu_devices_once()
        count_cpu_devices_once()
        assert [accelerator.device_count() for _ in range(5)] == [1] * 5
    finally:
        vars(accelerator).pop("device_count", None)
        if before is not None:
            accelerator.device_count = before
    assert len(calls) == 1
    assert "LOCAL_SIZE" not in os.environ  # it would switch on DeepSpeed's leaking shared-memory allreduce
