"""dpo_ds/engines: DeepSpeed config filling, model preparation (dropout, expert leaves), the learning-rate schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_ds.config import ConfigError, TrainConfig
from dpo_ds.engines import disable_dropout, mark_expert_blocks, resolve_policy_config, resolve_reference_config
from dpo_ds.engines.lifecycle import lr_scheduler
from helpers import tiny_causal_lm

HIDDEN = 48
CFG = dict(micro_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.7, precision="bf16", learning_rate=2e-5,
           adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.01)


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
    ({"zero_optimization": {"stage": 2}}, "stage must be 3"),
    ({}, None),  # no zero_optimization block at all: stage 3 is the default written in
])
def test_policy_config_refusals_name_the_file(tmp_path, config, message):
    source = ds_json(tmp_path, config)
    cfg = TrainConfig(deepspeed_config=source)
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
