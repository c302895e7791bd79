"""dpo_ds.loading: the streamed ZeRO-3 loader gives bitwise the files' weights and from_pretrained's logits.

The distributed part runs this file under torchrun (2 ranks): `python tests/test_loading.py DEMO_MODEL TIED_MODEL OUT`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dpo_ds.loading import plan_loading
from dpo_ds.safetensors_io import LoadError, TensorEntry, checkpoint_files, read_headers, read_range, read_tensor


def _tied_model(path: Path) -> Path:
    """A tiny tied-embedding Llama with GQA and an odd-sized bias (a padded last ZeRO partition on 2 ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=129, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, mlp_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.distributed
def test_streamed_loader_two_ranks(demo_assets, tmp_path):
    from helpers import launch

    tied = _tied_model(tmp_path / "tied")
    out = tmp_path / "report.json"
    launch([str(Path(__file__)), demo_assets.model_dir, str(tied), str(out)], nproc=2, timeout=300)
    report = json.loads(out.read_text())
    for name, checks in report.items():
        assert checks["mismatched_params"] == [], (name, checks["mismatched_params"])
        assert checks["checked_params"] > 0, name
        assert checks["logits_equal"], (name, checks["max_logit_diff"])
    demo = report["demo_fp32"]
    assert demo["same_as_hf_loader"] == [] and demo["training"] is False
    # the config as the checkpoint has it (forwards pass use_cache=False themselves): exports keep it for serving
    assert demo["use_cache"] == json.loads((Path(demo_assets.model_dir) / "config.json").read_text()).get("use_cache", True)
    assert report["tied"]["tied"] is True


def test_read_header_and_ranges_match_safetensors(demo_assets):
    from safetensors import safe_open

    files = checkpoint_files(demo_assets.model_dir)
    entries = read_headers(files)
    with safe_open(str(next(iter(files.values()))), "pt") as fh:
        assert set(fh.keys()) == set(entries)
        for key, entry in entries.items():
            expected = fh.get_tensor(key)
            assert torch.equal(read_tensor(entry), expected), key
            flat = expected.reshape(-1)
            part = torch.empty(min(7, flat.numel()), dtype=flat.dtype)
            read_range(entry, flat.numel() - part.numel(), part)
            assert torch.equal(part, flat[-part.numel():]), key


def test_plan_reports_missing_unexpected_and_shape_mismatch(demo_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir)
    entries = read_headers(checkpoint_files(demo_assets.model_dir))
    assert len(plan_loading(model, entries, "demo")) == len(list(model.parameters()))
    broken = dict(entries)
    del broken["model.norm.weight"]
    broken["model.extra.weight"] = entries["lm_head.weight"]
    e = entries["model.layers.0.mlp.up_proj.weight"]
    broken[e.key] = TensorEntry(e.file, e.key, e.dtype, (1, *e.shape), e.begin, e.end)
    with pytest.raises(LoadError) as err:
        plan_loading(model, broken, "demo")
    text = str(err.value)
    assert "missing from the checkpoint: model.norm.weight" in text
    assert "unexpected in the checkpoint: model.extra.weight" in text
    assert "shape mismatch: model.layers.0.mlp.up_proj.weight" in text


def test_non_safetensors_dir_is_a_clear_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="pytorch_model.bin"):
        checkpoint_files(tmp_path)


# ----------------------------------------------------------------------------- torchrun worker
def _check(model, model_dir: str, dtype: torch.dtype, ids: torch.Tensor, hf_model=None) -> dict:
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    files = checkpoint_files(model_dir)
    mismatched, checked, differs_from_hf = [], 0, []
    hf_params = dict(hf_model.named_parameters()) if hf_model is not None else {}
    for name, p in model.named_parameters():
        key = name if name in files else None
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if key is not None:
                with safe_open(str(files[key]), "pt") as fh:
                    expected = fh.get_tensor(key).to(dtype)
                if not torch.equal(p.data, expected):
                    mismatched.append(name)
                checked += 1
            if name in hf_params:
                with deepspeed.zero.GatheredParameters([hf_params[name]], modifier_rank=None):
                    if not torch.equal(p.data, hf_params[name].data):
                        differs_from_hf.append(name)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        got = model(input_ids=ids).logits
        want = plain(input_ids=ids).logits
    embed_name = "model.embed_tokens.weight"
    return {"mismatched_params": mismatched, "checked_params": checked, "same_as_hf_loader": differs_from_hf,
            "logits_equal": bool(torch.equal(got, want)), "max_logit_diff": float((got - want).abs().max()),
            "training": model.training, "use_cache": model.config.use_cache,
            "tied": model.lm_head.weight is dict(model.named_parameters())[embed_name]}


def _worker(demo_dir: str, tied_dir: str, out: str) -> None:
    import torch.distributed as dist

    from dpo_ds.config import TrainConfig
    from dpo_ds.engines import load_sharded_model, resolve_policy_config
    from dpo_ds.families import load_model_config
    from dpo_ds.loading import load_sharded_pretrained
    from launcher.dist import init_distributed

    env = init_distributed(timeout_s=120)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 99, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    report = {}
    for name, path, precision in (("demo_fp32", demo_dir, "fp32"), ("demo_bf16", demo_dir, "bf16"),
                                  ("tied", tied_dir, "fp32")):
        cfg = TrainConfig(model_name_or_path=path, train_file="unused.jsonl", precision=precision)
        ds = resolve_policy_config(cfg, env.world_size, load_model_config(path, False).hidden_size)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = load_sharded_pretrained(path, ds, dtype, False)
        hf = load_sharded_model(path, ds, dtype, False) if name == "demo_fp32" else None
        report[name] = _check(model, path, dtype, ids, hf)
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, report)
    if env.rank == 0:
        assert gathered[0] == gathered[1], gathered  # every rank saw the same weights and logits
        Path(out).write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    _worker(*sys.argv[1:4])
    from launcher.dist import exit_process

    exit_process(0)  # as the dpo-ds entry point does: no interpreter teardown after gloo


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("path", ["straight from the files", "per expert slice", "whole tensor"])
def test_checkpoint_layout_is_converted_as_from_pretrained_does(tmp_path, family, path):
    """Per-expert checkpoint tensors -> transformers' fused in-memory experts, read in odd-sized ranges (as the
    streamed loader reads partitions), by each of layout.ConvertedTensor's three ways."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {"mixtral": dict(num_local_experts=3), "qwen3_moe": dict(num_experts=3, moe_intermediate_size=24)}
    config = AutoConfig.for_model(family, vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2, **shapes[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), dtype=torch.float32)
    checkpoint = read_headers(checkpoint_files(tmp_path))
    plan = plan_loading(model, checkpoint, str(tmp_path))
    converted = [checkpoint[key] for key, _, _ in plan if not isinstance(checkpoint[key], TensorEntry)]
    assert len(converted) == 2 and all(t.concatenated for t in converted)  # gate_up_proj and down_proj
    for tensor in converted:
        tensor.concatenated = path == "straight from the files"
        tensor.sliced = tensor.sliced and path != "whole tensor"
        tensor.slice_numel = tensor.slice_numel if tensor.sliced else math.prod(tensor.shape)
    for key, target, _ in plan:
        flat = torch.empty(target.numel(), dtype=checkpoint[key].torch_dtype)
        for start in range(0, flat.numel(), 7):
            read_range(checkpoint[key], start, flat[start:start + 7])
        with torch.no_grad():
            target.copy_(flat.view(target.shape))
    got = model.state_dict()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    assert {type(c).__name__ for c in model._weight_conversions} >= {"WeightConverter"}  # recorded for saving
