"""`sequence_parallel_size: 2` end to end: `dpo-ds train` on 2 ranks sharing every sequence (one data-parallel
group) against a plain single-process PyTorch DPO of the same data (tests/helpers.plain_dpo: pair by pair,
without padding, sequence parallelism or DeepSpeed): padded rows with an offloaded live reference, packed rows
(padding_free) with precompute_ref, LD-DPO's token weights, LoRA from an adapter, a mixture-of-experts and a
tied-embedding family; the padded run's checkpoint resumed at S = 2 and S = 1; 4 ranks as 2 data-parallel groups
of S = 2; `dpo-ds eval` of the padded run's model at S = 2 (live and precomputed reference) against S = 1 and
plain PyTorch, and the run's own evaluation at S = 2; on the demo pairs with one
word more in every third rejected completion (the demo's chosen and rejected completions have equal lengths, so
packed rows would always have even widths). All runs share one launch (tests/dist_train_probe.py --runs)."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds import evaluate
from dpo_ds.config import ConfigError, TrainConfig
from dpo_ds.engines import resolve_padding_free
from dpo_ds.lora import peft_model_built
from dpo_ds.parallel import Parallel
from dpo_ds.trainer import check_sequence_parallel
from helpers import (completion_token_logps, launch_probe_runs, plain_dpo, read_metrics, write_config,
                     write_starting_adapter)
from test_families import tiny_model
from test_loss_runs import MENU

SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3, shuffle=False,
                learning_rate=2e-3, warmup_steps=1, lr_scheduler="linear", weight_decay=0.01, max_grad_norm=0.5,
                beta=0.1, logging_steps=1, gradient_checkpointing=True, ref_offload=True, seed=0,
                sequence_parallel_size=2)
TILE_TOKENS = 4  # tiled_mlp's tile in the tests (the default, hidden_size tokens, exceeds a demo sequence)
WORLD = 2  # one data-parallel group of S = 2 ranks: the pairs of a step are those of a 1-rank run
RUNS = {  # name -> fields over SETTINGS
    "padded": dict(save_steps=2),
    "packed_precompute_ref": dict(padding_free=True, precompute_ref=True),
    "packed_ld_dpo": dict(padding_free=True, ld_alpha=0.5),
    # the loss fields of tests/test_loss_runs.py's MENU, whose plain losses the test uses: WPO (its per-token terms
    # summed over the shards too) with the RPO term; KTO on the pairs split into examples (at this run's rate)
    "packed_wpo": dict(padding_free=True, **MENU["wpo"][0]),
    "kto": dict(MENU["kto"][0], loss_type="kto", learning_rate=2e-3),
    "tiled_mlp": dict(tiled_mlp=True),  # in tiles of PROBE_TILE_TOKENS tokens: several per shard
    "lora": dict(learning_rate=5e-3),  # + lora_adapter (the fixture's)
}
# tiny models of tests/test_families.py (4 attention heads, 2 key/value heads) trained at S = 2 in the same launch;
# Adam epsilon as there (near-zero embedding gradients); the reference precomputed under S = 2 (the probe compares
# a live reference engine's parameters with the files by name, which MoE checkpoints store per expert)
FAMILIES = {"mixtral": "mixture of experts", "gemma3_text": "tied embeddings, sliding-window layers"}
FAMILY_FIELDS = dict(adam_epsilon=1e-5, max_length=64, precompute_ref=True)
# `dpo-ds eval` of the padded run's final model (against the run's reference) on EVAL_PAIRS pairs, in the same launch
# after the runs: name -> flags. At S = 1 the 2 ranks are 2 data-parallel ranks, and the last forward of rank 1 has
# no pairs left (a stand-in); the padded run evaluates the same pairs itself at its end (eval_file), at S = 2.
EVALS = {"eval_s1": [], "eval_s2": ["--sequence_parallel_size", "2"],
         "eval_s2_precompute_ref": ["--sequence_parallel_size", "2", "--precompute_ref"]}  # + a --cache_dir of its own
EVAL_PAIRS, EVAL_MICRO_BATCH = 20, 4


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def starting_adapter(demo_assets, tmp_path_factory):
    """A PEFT adapter with non-zero B, so the LoRA run starts where a plain PEFT model can start too."""
    return write_starting_adapter(demo_assets.model_dir, tmp_path_factory.mktemp("sp_lora") / "adapter",
                                  ["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def train_file(demo_assets, tmp_path_factory) -> str:
    rows = [json.loads(line) for line in open(demo_assets.train_file)]
    for row in rows[::3]:
        row["rejected"] = " Try" + row["rejected"]  # one token more
    path = tmp_path_factory.mktemp("sp_data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def eval_file(train_file, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sp_eval_data") / "eval.jsonl"
    path.write_text("".join(open(train_file).readlines()[:EVAL_PAIRS]))
    return str(path)


@pytest.fixture(scope="module")
def family_models(demo_assets, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sp_families")
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    return {family: tiny_model(family, tokenizer, tmp / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def runs(demo_assets, train_file, eval_file, starting_adapter, family_models, tmp_path_factory):
    """name -> (output_dir, probe) of each run; of each of EVALS: (its per-pair file, probe)."""
    tmp = tmp_path_factory.mktemp("sequence_parallel_train")
    spec = []
    runs = {**{name: (demo_assets.model_dir, fields) for name, fields in RUNS.items()},
            **{family: (str(path), FAMILY_FIELDS) for family, path in family_models.items()}}
    for name, (model, extra) in runs.items():
        if name == "lora":
            extra = dict(extra, lora_adapter=str(starting_adapter))
        if name == "padded":
            extra = dict(extra, eval_file=eval_file)
        cfg = write_config(tmp / f"{name}.yaml", model_name_or_path=model, train_file=train_file,
                           output_dir=str(tmp / name), **{**SETTINGS, **extra})
        spec.append((cfg, tmp / f"{name}.pt"))
    for name, flags in EVALS.items():
        cache = ["--cache_dir", str(tmp / f"{name}_cache")] if "--precompute_ref" in flags else []
        spec.append((["eval", "--model", str(tmp / "padded" / "final"), "--data", eval_file, "--micro_batch_size",
                      str(EVAL_MICRO_BATCH), "--output", str(tmp / f"{name}.jsonl"), *flags, *cache],
                     tmp / f"{name}.pt"))
    launch_probe_runs(spec, tmp / "spec.json", nproc=WORLD, env={"PROBE_TILE_TOKENS": str(TILE_TOKENS)})
    return {**{name: (tmp / name, torch.load(tmp / f"{name}.pt", weights_only=True)) for name in runs},
            **{name: (tmp / f"{name}.jsonl", torch.load(tmp / f"{name}.pt", weights_only=True)) for name in EVALS}}


@pytest.fixture(scope="module")
def four_ranks(demo_assets, train_file, tmp_path_factory):
    """4 ranks: 2 data-parallel groups of S = 2 (ranks 0, 1 and 2, 3)."""
    tmp = tmp_path_factory.mktemp("sequence_parallel_4_ranks")
    cfg = write_config(tmp / "run.yaml", model_name_or_path=demo_assets.model_dir, train_file=train_file,
                       output_dir=str(tmp / "out"), **SETTINGS)
    launch_probe_runs([(cfg, tmp / "probe.pt")], tmp / "spec.json", nproc=4)
    return tmp / "out", torch.load(tmp / "probe.pt", weights_only=True)


def _assert_matches(out: Path, expected_losses: list[float], got_weights: dict, expected_weights: dict,
                    initial: dict) -> None:
    got_losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(got_losses) == SETTINGS["max_steps"]
    for got, want in zip(got_losses, expected_losses):
        assert abs(got - want) <= 1e-6 * abs(want), (got_losses, expected_losses)
    assert set(got_weights) == set(expected_weights)
    update = torch.cat([(expected_weights[n] - initial[n]).flatten() for n in expected_weights]).norm()
    gap = torch.cat([(got_weights[n] - expected_weights[n]).flatten() for n in expected_weights]).norm()
    assert update > 1e-2  # training really changed the weights...
    assert gap <= 1e-5 * update, (float(gap), float(update))  # ...as the plain single-process DPO did
    assert max(float((got_weights[n] - w).abs().max()) for n, w in expected_weights.items()) < 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["padded", "packed_precompute_ref", "packed_ld_dpo", "packed_wpo", "kto", "tiled_mlp"])
def test_s2_matches_plain_single_process_dpo(runs, demo_assets, train_file, name):
    out, probe = runs[name]
    settings = {**SETTINGS, **RUNS[name]}
    loss = {"packed_wpo": "wpo", "kto": "kto"}.get(name)  # written out in tests/test_loss_runs.py's MENU
    extra = dict(pair_losses=MENU[loss][1](), unpaired=loss == "kto") if loss else {}
    expected_losses, expected_weights = plain_dpo(demo_assets.model_dir, train_file, settings, 1, **extra)
    _assert_matches(out, expected_losses, _weights(out / "final"), expected_weights,
                    load_file(f"{demo_assets.model_dir}/model.safetensors"))
    assert set(probe["attention"]) == {"sdpa"}  # the kernel the Ulysses attention wraps (auto under S > 1)
    assert probe["tiled_mlp_blocks"] == (2 if name == "tiled_mlp" else 0)  # the demo model's 2 layers


@pytest.mark.distributed
def test_two_data_parallel_groups_of_s2_match_plain_dpo_on_two_ranks(four_ranks, demo_assets, train_file):
    out, probe = four_ranks
    expected_losses, expected_weights = plain_dpo(demo_assets.model_dir, train_file, SETTINGS, 2)
    _assert_matches(out, expected_losses, _weights(out / "final"), expected_weights,
                    load_file(f"{demo_assets.model_dir}/model.safetensors"))
    # DeepSpeed counts 2 data-parallel ranks: 2 pairs x 2 micro-steps x 2
    assert probe["policy_resolved"]["train_batch"] == 8


@pytest.mark.distributed
@pytest.mark.parametrize("family", list(FAMILIES))
def test_s2_families_match_plain_dpo(runs, family_models, train_file, family, tmp_path):
    out, _ = runs[family]
    model_dir = family_models[family]
    expected_losses, trained = plain_dpo(str(model_dir), train_file, {**SETTINGS, **FAMILY_FIELDS}, 1)
    # compared as saved (MoE experts on disk are per-expert tensors; a tied embedding is saved once)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain.load_state_dict(trained, strict=False)
    plain.save_pretrained(tmp_path / "plain")
    _assert_matches(out, expected_losses, _weights(out / "final"), _weights(tmp_path / "plain"), _weights(model_dir))


@pytest.mark.distributed
def test_s2_lora_matches_plain_peft_dpo(runs, demo_assets, train_file, starting_adapter):
    out, probe = runs["lora"]
    with peft_model_built():
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.model_dir,
                                                                                dtype=torch.float32),
                                           starting_adapter, is_trainable=True)
    reference = copy.deepcopy(policy).requires_grad_(False)
    settings = {**SETTINGS, **RUNS["lora"]}
    expected_losses, _ = plain_dpo(demo_assets.model_dir, train_file, settings, 1, policy=policy,
                                   reference=reference)
    _assert_matches(out, expected_losses, load_file(str(out / "final_adapter" / "adapter_model.safetensors")),
                    get_peft_model_state_dict(policy), load_file(str(starting_adapter / "adapter_model.safetensors")))
    assert probe["reference"] == "AdapterReference" and probe["deepspeed_engines"] == 1


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """The padded run's step-2 checkpoint resumed to step 3: at S = 2 and at S = 1 on 2 data-parallel ranks
    (gradient accumulation halved: the same pairs per step) in one launch, at S = 1 on 1 rank (another world size:
    the universal checkpoint) in another."""
    out, _ = runs["padded"]
    tmp = tmp_path_factory.mktemp("sequence_parallel_resume")
    base = yaml.safe_load((out / "run_config.json").read_text())
    resumes = {"s2": (2, {}), "s1_two_ranks": (2, dict(sequence_parallel_size=1, gradient_accumulation_steps=1)),
               "s1_one_rank": (1, dict(sequence_parallel_size=1))}
    for nproc in (2, 1):
        spec = []
        for name, (ranks, fields) in resumes.items():
            if ranks == nproc:
                cfg = write_config(tmp / f"{name}.yaml", **{**base, **fields, "output_dir": str(tmp / name),
                                                            "resume_from": str(out / "checkpoints" / "step-00000002"),
                                                            "cache_dir": str(out / "caches")})
                spec.append((cfg, tmp / f"{name}.pt"))
        launch_probe_runs(spec, tmp / f"spec{nproc}.json", nproc=nproc)
    return {name: tmp / name for name in resumes}


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["s2", "s1_two_ranks", "s1_one_rank"])
def test_an_s2_checkpoint_resumes_exactly(runs, resumed, name):
    out, _ = runs["padded"]
    full = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    again = {m["step"]: m["loss"] for m in read_metrics(resumed[name]) if "loss" in m}
    assert sorted(again) == [3]
    expected, got = _weights(out / "final"), _weights(resumed[name] / "final")
    if name == "s2":  # the same ranks doing the same work: bit for bit
        assert again[3] == full[3]
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    else:  # gradients reduced over other groups (and the universal checkpoint's reload): rounding only
        assert abs(again[3] - full[3]) <= 1e-6 * full[3]
        assert max(float((got[k] - expected[k]).abs().max()) for k in expected) < 1e-6


@pytest.mark.distributed
def test_precomputed_reference_is_written_once_per_data_parallel_group(runs):
    out, probe = runs["packed_precompute_ref"]
    assert probe["reference"] == "CachedReference"
    caches = [p for p in (out / "caches").glob("ref-*") if p.is_dir()]
    assert len(caches) == 1
    assert sorted(p.name for p in caches[0].glob("rank-*")) == ["rank-00000-of-00001.safetensors"]
    assert json.loads((caches[0] / "complete.json").read_text())["ranks"] == 1


SCORES = ("policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp", "chosen_reward",
          "rejected_reward", "margin", "loss")  # of a per-pair record; its other fields are compared exactly


LOGPS = {"chosen_reward": ("policy_chosen_logp", "ref_chosen_logp"),  # the log-prob sums each score comes from
         "rejected_reward": ("policy_rejected_logp", "ref_rejected_logp"),
         "margin": SCORES[:4], "loss": SCORES[:4], **{key: (key,) for key in SCORES[:4]}}


def _close(got: dict, want: dict, key: str) -> bool:
    """got[key] within 1e-6 relative of want[key], relative to the log-prob sums it is computed from: a log-prob
    within 1e-6 of itself (fp32 sums of about 30 differ by a few 1e-6 when batched otherwise), a reward, margin
    or loss within 1e-6 of beta x the sums it is a difference of (rewards of about 0.01 are differences of sums of
    about 30, and carry their rounding)."""
    scale = sum(abs(want[k]) for k in LOGPS[key]) * (1 if key in SCORES[:4] else SETTINGS["beta"])
    return abs(got[key] - want[key]) <= 1e-6 * scale


@pytest.fixture(scope="module")
def plain_eval(runs, demo_assets, eval_file) -> list[dict]:
    """The per-pair records of `dpo-ds eval` in plain PyTorch: the padded run's final model and its reference (the
    starting model), sequence by sequence without padding, sharding or DeepSpeed; the sigmoid loss at beta."""
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    policy = AutoModelForCausalLM.from_pretrained(runs["padded"][0] / "final", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32).eval()
    beta, records = SETTINGS["beta"], []
    with torch.no_grad():
        for row in map(json.loads, open(eval_file)):
            (pc, pr), (rc, rr) = ([completion_token_logps(m, tok, row["prompt"], row[side])[0].double()
                                   for side in ("chosen", "rejected")] for m in (policy, reference))
            chosen, rejected = beta * (pc.sum() - rc.sum()), beta * (pr.sum() - rr.sum())
            records.append({"policy_chosen_logp": pc.sum(), "policy_rejected_logp": pr.sum(), "ref_chosen_logp": rc.sum(),
                            "ref_rejected_logp": rr.sum(), "chosen_tokens": len(pc), "rejected_tokens": len(pr),
                            "chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected,
                            "loss": -torch.nn.functional.logsigmoid(chosen - rejected)})
    return [{k: float(v) if k in SCORES else v for k, v in r.items()} for r in records]


def _mean_record(records: list[dict]) -> dict:
    return {key: sum(r[key] for r in records) / len(records) for key in SCORES}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(EVALS))
def test_eval_records_each_pair_once_as_plain_pytorch_scores_it(runs, plain_eval, name):
    """`dpo-ds eval` at S = 2 (one data-parallel group: every forward on a shard of each sequence) and at S = 1 (2
    data-parallel ranks): one record per pair, in pair order, with plain PyTorch's log-probs, rewards, margin and
    loss; the summary counts each pair once."""
    path, probe = runs[name]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(EVAL_PAIRS))
    for got, want in zip(records, plain_eval):
        assert (got["chosen_tokens"], got["rejected_tokens"]) == (want["chosen_tokens"], want["rejected_tokens"])
        assert got["correct"] == (want["margin"] > 0)
        assert all(_close(got, want, key) for key in SCORES), (got, want)
    summary = probe["summary"]
    assert summary["pairs"] == EVAL_PAIRS
    mean = _mean_record(plain_eval)
    assert _close({"loss": summary["loss"], "margin": summary["mean_margin"]}, mean, "loss")
    assert _close({"loss": summary["loss"], "margin": summary["mean_margin"]}, mean, "margin")
    assert summary["accuracy"] == pytest.approx(sum(r["margin"] > 0 for r in plain_eval) / EVAL_PAIRS, rel=1e-6)
    # S = 2: each rank scored half of every sequence, the policy's and (live, or once for the cache) the reference's
    forwards = 2 * -(-EVAL_PAIRS // EVAL_MICRO_BATCH)
    assert len(probe["sharded_forwards"]) == (0 if name == "eval_s1" else forwards)


@pytest.mark.distributed
def test_eval_at_s2_matches_s1_and_the_runs_own_evaluation(runs, demo_assets, eval_file):
    """S = 2 against S = 1 record by record (1e-6 relative), on micro-batches some of whose widths S does not
    divide; the padded run's evaluation of the same pairs at its end (S = 2, the final weights) has the summary's
    numbers; the precomputed reference is written once (one data-parallel group)."""
    s1 = [json.loads(line) for line in runs["eval_s1"][0].read_text().splitlines()]
    for name in ("eval_s2", "eval_s2_precompute_ref"):
        s2 = [json.loads(line) for line in runs[name][0].read_text().splitlines()]
        for got, want in zip(s2, s1, strict=True):
            assert {k: v for k, v in got.items() if k not in SCORES} == {k: v for k, v in want.items() if k not in SCORES}
            assert all(_close(got, want, key) for key in SCORES), (got, want)
    assert any(max(seqs) % 2 for seqs in _micro_batch_lengths(demo_assets, eval_file, EVAL_MICRO_BATCH, EVAL_PAIRS))
    summary, mean = runs["eval_s1"][1]["summary"], _mean_record(s1)
    (in_run,) = [m for m in read_metrics(runs["padded"][0]) if "eval/loss" in m]
    got = {"loss": in_run["eval/loss"], "margin": in_run["eval/rewards/margins"]}
    assert _close(got, dict(mean, loss=summary["loss"], margin=summary["mean_margin"]), "loss")
    assert _close(got, dict(mean, loss=summary["loss"], margin=summary["mean_margin"]), "margin")
    assert in_run["eval/rewards/accuracies"] == pytest.approx(summary["accuracy"], rel=1e-6)
    (cache,) = (runs["eval_s2_precompute_ref"][0].parent / "eval_s2_precompute_ref_cache").glob("ref-*")
    assert sorted(p.name for p in cache.glob("rank-*")) == ["rank-00000-of-00001.safetensors"]


@pytest.mark.distributed
def test_the_runs_cut_sequences_whose_length_is_not_a_multiple_of_s(demo_assets, train_file):
    """The micro-batches above include widths S does not divide (shard_batch pads them), in both layouts."""
    b = SETTINGS["micro_batch_size"]
    lengths = _micro_batch_lengths(demo_assets, train_file, b, b * SETTINGS["gradient_accumulation_steps"] *
                                   SETTINGS["max_steps"])
    assert any(max(seqs) % 2 for seqs in lengths)  # padded rows: the longest sequence
    assert any(sum(seqs) % 2 for seqs in lengths)  # packed: the row of all sequences


def _micro_batch_lengths(demo_assets, data_file: str, micro_batch_size: int, pairs: int) -> list[list[int]]:
    """The sequence lengths (prompt + completion + EOS, as plain_dpo tokenizes) of each micro-batch of the first
    `pairs` pairs of `data_file`, cut in file order."""
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    rows = [json.loads(line) for line in open(data_file)][:pairs]

    def length(prompt: str, completion: str) -> int:
        full = tok(prompt + completion)["input_ids"]
        return len(full) + (full[-1] != tok.eos_token_id)

    return [[length(r["prompt"], r[side]) for r in rows[i:i + micro_batch_size] for side in ("chosen", "rejected")]
            for i in range(0, len(rows), micro_batch_size)]


def _config(demo_assets, **fields) -> TrainConfig:
    """The run's config as train checks it: padding_free auto settled first (trainer.check_before_loading)."""
    cfg = TrainConfig(model_name_or_path=demo_assets.model_dir, train_file=demo_assets.train_file, **fields)
    resolve_padding_free(cfg)
    return cfg


BAD_SETTINGS = [
    (dict(sequence_parallel_size=3), 6, "does not divide the model's 4 attention heads"),
    (dict(sequence_parallel_size=2), 3, "does not divide the world size 3"),
    (dict(sequence_parallel_size=2, attn_implementation="eager"), 2, "eager attention"),
]


@pytest.mark.parametrize("fields, world, message", BAD_SETTINGS)
def test_bad_settings_are_refused_before_loading_with_the_field_named(demo_assets, fields, world, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_sequence_parallel(_config(demo_assets, **fields), world)
    assert str(err.value).startswith("field 'sequence_parallel_size': ") and "\n" not in str(err.value)


@pytest.mark.parametrize("fields, world, message", BAD_SETTINGS)
def test_eval_refuses_what_train_refuses_before_loading(demo_assets, fields, world, message, tmp_path, monkeypatch):
    """`dpo-ds eval --sequence_parallel_size S` on `world` ranks (the process group faked: the world size Parallel
    would find): train's one-line error, before the tokenizer, the pairs or a model load; nothing written."""
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--model", demo_assets.model_dir, "--data", demo_assets.heldout_file, "--output",
                              str(tmp_path / "pairs.jsonl"), "--cache_dir", str(tmp_path / "cache"),
                              *(str(a) for field, value in fields.items() for a in (f"--{field}", value))])
    monkeypatch.setattr(Parallel, "init", classmethod(lambda cls, timeout_s, sequence_parallel_size=1:
                                                      cls(0, world, sequence_parallel_size)))
    monkeypatch.setattr(evaluate, "setup_logging", lambda rank: None)
    monkeypatch.setattr(evaluate, "load_pairs", None)  # reached only past the checks
    with pytest.raises(ConfigError, match=message) as err:
        evaluate.run(args)
    assert str(err.value).startswith("field 'sequence_parallel_size': ") and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
