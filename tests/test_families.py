"""The family matrix: every family of dpo_ds.families.SUPPORTED_FAMILIES, as a tiny random model with the demo
tokenizer, trained by a 2-rank ZeRO-3 run (default weights_loader: streamed; dropout as the family's config
has it) and checked against a plain single-process PyTorch DPO (tests/helpers.plain_dpo); its `final/` and
`dpo-ds convert` of its checkpoint against `save_pretrained` of the plain-trained model (names, shapes,
dtypes, values); the exported model reloaded by transformers against the live engine's logits. All families
run one after the other in one torchrun launch (tests/dist_families_probe.py)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dpo_ds.config import ConfigError, TrainConfig
from dpo_ds.families import SUPPORTED_FAMILIES, check_model_family
from helpers import REPO, launch, plain_dpo, read_metrics, write_config

SETTINGS = dict(precision="fp32", micro_batch_size=1, gradient_accumulation_steps=1, max_steps=2, shuffle=False,
                learning_rate=1e-3, warmup_steps=0, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=0.5,
                beta=0.1, logging_steps=1, gradient_checkpointing=True, seed=0, save_steps=2, max_length=64,
                # Adam divides by |g| + eps: at 1e-8, embedding rows with near-zero gradients (sums that cancel) turn
                # float rounding differences into 1e-5 weight differences; 1e-6 was enough until transformers 5.24,
                # where Gemma-3's tied embedding still moved one element by 1.9e-5 (mean difference 7e-9);
                # 1e-5 keeps the comparison about the method
                adam_epsilon=1e-5)
WORLD = 2
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
SHAPES = {  # tiny configs: 2 layers, hidden 32; MoE: 4 experts, 2 per token
    "llama": SMALL, "mistral": SMALL, "qwen2": SMALL, "phi3": SMALL, "olmo2": SMALL,
    "qwen3": {**SMALL, "head_dim": 8},
    "qwen3_moe": {**SMALL, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mixtral": {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {**SMALL, "head_dim": 8}, "gemma3_text": {**SMALL, "head_dim": 8},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
}
MOE = ("qwen3_moe", "mixtral")
AUX_COEF = 0.05
PROBE = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 31, 32, 33, 34, 35, 36]])


def tiny_model(family: str, tokenizer, path: Path) -> Path:
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **SHAPES[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    spec, out = [], {}
    variants = [("mixtral_aux", "mixtral", {"router_aux_loss_coef": AUX_COEF}),
                ("mixtral_hf", "mixtral", {"weights_loader": "transformers"})]
    for name, family, extra in [(f, f, {}) for f in SUPPORTED_FAMILIES] + variants:
        model = tmp / "models" / family
        if not model.exists():
            tiny_model(family, tokenizer, model)
        cfg = write_config(tmp / f"{name}.yaml", model_name_or_path=str(model), train_file=demo_assets.train_file,
                           output_dir=str(tmp / name), **SETTINGS, **extra)
        spec.append({"family": name, "config": str(cfg), "report": str(tmp / f"{name}.pt")})
        out[name] = (tmp / name, model)
    (tmp / "spec.json").write_text(json.dumps(spec))
    launch(["tests/dist_families_probe.py", str(tmp / "spec.json")], nproc=WORLD, timeout=1800)
    return {name: (run_dir, model, torch.load(tmp / f"{name}.pt", weights_only=True))
            for name, (run_dir, model) in out.items()}


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:8])
    for name, tensor in want.items():
        assert (got[name].shape, got[name].dtype) == (tensor.shape, tensor.dtype), (what, name)
    worst = max(float((got[n].float() - w.float()).abs().max()) for n, w in want.items())
    assert worst < 1e-5, (what, worst)


@pytest.mark.parametrize("family", list(SUPPORTED_FAMILIES))
@pytest.mark.distributed
def test_family_trains_like_plain_dpo_and_saves_like_save_pretrained(runs, family, demo_assets, tmp_path):
    from dpo_ds.convert import convert_checkpoint

    run_dir, model_dir, report = runs[family]
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert abs(losses[0] - math.log(2)) < 1e-6, losses  # dropout off: policy == reference at step 1
    want_losses, want_weights = plain_dpo(str(model_dir), demo_assets.train_file, SETTINGS, WORLD)
    assert len(losses) == SETTINGS["max_steps"]
    assert max(abs(g - w) for g, w in zip(losses, want_losses)) < 1e-6, (losses, want_losses)

    # what save_pretrained writes for the plain-trained weights: the on-disk layout servers load
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain.load_state_dict(want_weights, strict=False)
    plain.save_pretrained(tmp_path / "save_pretrained")
    reference = _safetensors(tmp_path / "save_pretrained")
    if family in MOE:  # servers load per-expert tensors, not transformers' fused in-memory ones
        assert any(".experts.0." in n for n in reference) and not any(n.endswith("gate_up_proj") for n in reference)
    moved = max(float((reference[n] - w).abs().max()) for n, w in _safetensors(model_dir).items())
    assert moved > 5e-4  # training really changed the weights

    _assert_same_tensors(_safetensors(run_dir / "final"), reference, "final/")
    converted = convert_checkpoint(str(run_dir / "checkpoints" / "step-00000002"), str(tmp_path / "converted"),
                                   dtype="fp32")
    _assert_same_tensors(_safetensors(converted), reference, "dpo-ds convert")
    for exported in (run_dir / "final", converted):  # the model's own config values (dropout, cache) come back
        assert json.loads((exported / "config.json").read_text()).get("attn_pdrop") == \
            json.loads((model_dir / "config.json").read_text()).get("attn_pdrop")
        assert AutoConfig.from_pretrained(exported).use_cache == AutoConfig.from_pretrained(model_dir).use_cache

    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=PROBE).logits
    assert torch.allclose(logits, report["logits"], atol=1e-5, rtol=0)
    if family in MOE:  # two training steps with each rank's tokens routed to other experts: no hang, both ran
        assert report["experts_reached"] == [[0, 1], [2, 3]]


@pytest.mark.distributed
def test_router_aux_loss_is_logged_and_trained(runs):
    aux_dir, _, _ = runs["mixtral_aux"]
    plain_dir, _, _ = runs["mixtral"]
    metrics = [m for m in read_metrics(aux_dir) if "loss" in m]
    assert all(math.isfinite(m["aux_loss"]) and m["aux_loss"] > 0 for m in metrics)
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-6  # the logged loss stays the DPO loss
    assert all("aux_loss" not in m for m in read_metrics(plain_dir))
    with_aux, without = _safetensors(aux_dir / "final"), _safetensors(plain_dir / "final")
    router = [n for n in with_aux if n.endswith("gate.weight") and "experts" not in n]
    assert router and max(float((with_aux[n] - without[n]).abs().max()) for n in router) > 1e-6


@pytest.mark.distributed
def test_transformers_loader_trains_and_exports_the_same(runs):
    """weights_loader: transformers (from_pretrained converts the layout itself) gives the streamed loader's run."""
    streamed, _, _ = runs["mixtral"]
    loaded, _, _ = runs["mixtral_hf"]
    losses = [[m["loss"] for m in read_metrics(d) if "loss" in m] for d in (streamed, loaded)]
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-7, losses
    _assert_same_tensors(_safetensors(loaded / "final"), _safetensors(streamed / "final"), "weights_loader transformers")


def test_readme_lists_the_tested_families():
    readme = (REPO / "README.md").read_text()
    section = re.search(r"<!-- families -->\n(.*?)<!-- /families -->", readme, re.S)
    assert section, "README.md: no <!-- families --> list"
    listed = re.findall(r"^- (.+?) \(`([a-z0-9_]+)`\)", section.group(1), re.M)
    assert listed == [(name, model_type) for model_type, name in SUPPORTED_FAMILIES.items()]


def test_a_model_that_cannot_work_is_refused_before_loading(tmp_path, demo_assets):
    AutoConfig.for_model("t5", d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    cfg = TrainConfig(model_name_or_path=str(tmp_path / "t5"), train_file="unused.jsonl")
    with pytest.raises(ConfigError, match=r"t5 model, which dpo-ds cannot train: it is an encoder-decoder"):
        check_model_family(cfg)
    cfg = TrainConfig(model_name_or_path=demo_assets.model_dir, train_file="unused.jsonl", router_aux_loss_coef=0.1)
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef.*llama model, which has no router"):
        check_model_family(cfg)


def test_blocks_with_per_expert_modules_become_zero3_leaves():
    """Experts kept as separate modules (remote-code MoE models): their block is gathered and reduced as one
    ZeRO-3 leaf, so ranks routing to different experts run the same modules."""
    from deepspeed.utils import z3_leaf_module

    from dpo_ds.engines import mark_expert_blocks

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    model = torch.nn.Sequential(Block(), torch.nn.Linear(4, 4))
    assert mark_expert_blocks(model) == 1
    assert z3_leaf_module(model[0]) and not z3_leaf_module(model[1])
    fused = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", num_local_experts=2, **SMALL))
    assert mark_expert_blocks(fused) == 0  # transformers' fused experts always run: nothing to do
