"""`dpo-ds prepare` and the prepared-pairs cache in real runs: a preparation longer than dist_timeout_s, one
cache shared by prepare, a 2-rank train and eval."""
from __future__ import annotations

import json
import re

import pytest

from helpers import launch, read_metrics, run_cli, write_config

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


def test_slow_preparation_outlives_dist_timeout_and_prepare_train_eval_share_one_cache(demo_assets, tmp_path):
    out, caches = tmp_path / "out", tmp_path / "out" / "caches"
    config = write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir,
                          train_file=demo_assets.train_file, output_dir=str(out), precision="fp32",
                          micro_batch_size=2, max_steps=2, max_length=64, logging_steps=1, prepare_workers=2,
                          dist_timeout_s=10)
    # rank 0 tokenizes for 25 s (> dist_timeout_s): rank 1 must wait on the rendezvous store, not in a collective
    proc = launch(["tests/slow_prepare_probe.py", "train", "--config", str(config)], env={"SLOW_PREPARE_S": "25"})
    log = proc.stderr
    assert "Timed out" not in log
    prepared = re.search(r"prepared (\d+) pairs \((\d+) tokens\) in ([\d.]+) s \(\d+ pairs/s\) -> (\S+)", log)
    assert prepared and float(prepared[3]) > 10 and int(prepared[1]) == 96, log[-3000:]
    assert re.search(r"step 1 done [\d.]+ s after the process started", log)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]
    cache = prepared[4]
    assert [str(p) for p in caches.glob("pairs-*")] == [cache]

    # `dpo-ds prepare` on the same config finds that cache (same fingerprint) and reports it without tokenizing
    proc = run_cli(["prepare", "--config", str(config)])
    assert "prepared 96" not in proc.stderr and f"cache: {cache}" in proc.stderr
    assert "96 rows -> 96 pairs kept; 0 bad rows skipped, 0 pairs dropped" in proc.stderr
    assert re.search(r"prompt \+ longer completion\s+\d+\s+\d+\s+\d+\s+\d+", proc.stderr)
    assert "would keep 99% of the pairs whole" in proc.stderr
    assert [str(p) for p in caches.glob("pairs-*")] == [cache]

    # `dpo-ds eval` of the run's model with the same settings reads the run's cache
    proc = run_cli(["eval", "--model", str(out / "final"), "--data", demo_assets.train_file, "--max_length", "64",
                    "--output", str(tmp_path / "eval.jsonl")])
    assert json.loads(proc.stdout.strip().splitlines()[-1])["pairs"] == 96
    assert f"in {cache}" in proc.stderr and "prepared 96" not in proc.stderr
    assert [str(p) for p in caches.glob("pairs-*")] == [cache]


def test_show_prints_each_part_decoded_with_its_whitespace(demo_assets):
    """Issue 25: `dpo-ds prepare --show N` lets a user check what a chat template made of the pairs."""
    from transformers import AutoTokenizer

    from dpo_ds.data import TokenizedPairs
    from dpo_ds.prepare import show_pairs

    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    ids = {name: tok(text, add_special_tokens=False)["input_ids"]
           for name, text in (("prompt", "Question: a fruit?"), ("chosen", " apple\n"), ("rejected", " cat"))}
    pairs = TokenizedPairs(prompt=[ids["prompt"]] * 3, chosen=[ids["chosen"] + [tok.eos_token_id]] * 3,
                           rejected=[ids["rejected"]] * 3, pair_ids=["f:1", "f:2", "f:3"])
    lines = show_pairs(pairs, tok, 2).splitlines()
    assert len(lines) == 8 and lines[0] == (f"pair 1 of 3 (f:1): {len(ids['prompt'])} prompt + "
                                            f"{len(ids['chosen']) + 1} chosen + {len(ids['rejected'])} rejected tokens")
    chosen = tok.decode(ids["chosen"] + [tok.eos_token_id], skip_special_tokens=False)
    assert lines[2] == f"  chosen   {chosen!r}" and lines[2].endswith(f"{tok.eos_token}'")
    assert lines[4].startswith("pair 2 of 3 (f:2)")


def test_show_and_counts_name_unpaired_examples_with_their_label(demo_assets):
    """KTO's unpaired rows are examples with a label, not pairs: `--show` prints the label in words (not its stored
    id decoded as a token) and the messages count examples."""
    from transformers import AutoTokenizer

    from dpo_ds.data import TokenColumn, TokenizedPairs, TokenizedUnpaired
    from dpo_ds.prepare import show_pairs

    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    prompt, completion = (tok(text, add_special_tokens=False)["input_ids"] for text in ("Question: a fruit?", " pear"))
    examples = TokenizedUnpaired.from_store({"prompt": TokenColumn.from_lists([prompt] * 2),
                                             "completion": TokenColumn.from_lists([completion] * 2),
                                             "label": TokenColumn.from_lists([[1], [0]])}, ["u:1", "u:2"],
                                            fingerprint="test")
    lines = show_pairs(examples, tok, 2).splitlines()
    assert lines[0] == f"example 1 of 2 (u:1, desirable): {len(prompt)} prompt + {len(completion)} completion tokens"
    assert lines[2] == f"  completion {tok.decode(completion)!r}" and len(lines) == 6
    assert lines[3].startswith("example 2 of 2 (u:2, undesirable)")
    assert examples.counted() == "2 examples" and examples.counted(1) == "1 example"
    assert TokenizedPairs(prompt=[prompt], chosen=[completion], rejected=[completion]).counted() == "1 pair"
