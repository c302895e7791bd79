"""The embedded demo assets: deterministic, rule-consistent, split cleanly, and loadable by transformers."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds.demo_data import CATEGORIES, N_HELDOUT_PROMPTS, DemoAssets, build_demo_assets, is_preferred, make_pairs

SMALL = dict(n_train=64, n_heldout=32, hidden_size=32, num_layers=1)  # fast builds; the format is the same


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> DemoAssets:
    return build_demo_assets(str(tmp_path_factory.mktemp("demo")), **SMALL)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets.model_dir)


def test_build_is_byte_identical_across_runs(assets, tmp_path):
    again = build_demo_assets(str(tmp_path / "again"), **SMALL)
    assert _bytes(again.train_file) == _bytes(assets.train_file)
    assert _bytes(again.heldout_file) == _bytes(assets.heldout_file)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "model.safetensors"):
        assert _bytes(os.path.join(again.model_dir, name)) == _bytes(os.path.join(assets.model_dir, name)), name
    assert AutoTokenizer.from_pretrained(again.model_dir).get_vocab() == AutoTokenizer.from_pretrained(assets.model_dir).get_vocab()


def test_files_hold_the_requested_pairs(assets):
    train, heldout = _rows(assets.train_file), _rows(assets.heldout_file)
    assert train == make_pairs(SMALL["n_train"], 0, "train")
    assert heldout == make_pairs(SMALL["n_heldout"], 0, "heldout")
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in train + heldout)


def test_seed_changes_the_pairs():
    assert make_pairs(32, 0, "train") != make_pairs(32, 1, "train")


def test_heldout_prompts_never_occur_in_train():
    # More pairs than either pool holds, and different seeds: the split must not depend on either.
    train = {row["prompt"] for row in make_pairs(2000, 0, "train")}
    heldout = {row["prompt"] for row in make_pairs(500, 7, "heldout")}
    assert heldout and train and not heldout & train
    assert len(heldout) == 144 and len(train) == 432  # every prompt is used, split 1:3


def test_default_heldout_size_repeats_no_prompt():
    heldout = make_pairs(N_HELDOUT_PROMPTS, 0, "heldout")
    assert len({row["prompt"] for row in heldout}) == len(heldout)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_pair_follows_the_rule(split):
    for row in make_pairs(1000, 3, split):
        assert is_preferred(row["prompt"], row["chosen"]), row
        assert not is_preferred(row["prompt"], row["rejected"]), row
        # Like real preference data: same prompt, responses differ in one word only.
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected)
        assert sum(a != b for a, b in zip(chosen, rejected)) == 1, row


def test_items_are_balanced_between_chosen_and_rejected():
    # An untrained model can only score ~50% if no category is more often chosen than rejected.
    category_of = {item: category for category, items in CATEGORIES.items() for item in items}
    chosen, rejected = Counter(), Counter()
    for row in make_pairs(6000, 0, "train"):
        chosen[category_of[row["chosen"].split()[-1].strip(".?")]] += 1
        rejected[category_of[row["rejected"].split()[-1].strip(".?")]] += 1
    for category in CATEGORIES:
        assert abs(chosen[category] - rejected[category]) < 0.1 * chosen[category], category


def test_is_preferred_rule():
    prompt = "Question: Mia needs a tool for a story. Which one? Answer:"
    assert is_preferred(prompt, " How about hammer?")
    assert is_preferred(prompt, " Hammer, or a saw.")
    assert not is_preferred(prompt, " How about violin?")  # not a category member at all
    assert not is_preferred(prompt, " How about tennis?")  # member of another category
    assert not is_preferred(prompt, " A hammer or a banana.")  # mixes in a wrong item
    assert not is_preferred(prompt, "")
    with pytest.raises(ValueError):
        is_preferred("Question: What is the weather like? Answer:", " Sunny.")
    with pytest.raises(ValueError):
        make_pairs(1, 0, "validation")


def test_model_dir_loads_and_runs(assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings is False
    ids = torch.tensor([tokenizer(make_pairs(1, 0, "train")[0]["prompt"]).input_ids])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_special_tokens(tokenizer):
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert None not in ids and len(ids) == 4  # all set, all distinct: padding never hides EOS
    encoded = tokenizer("Question: Name a fruit. Answer: Try apple.").input_ids
    assert encoded[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in encoded
    assert tokenizer.unk_token_id not in encoded


def test_every_word_is_one_token_and_texts_are_short(tokenizer):
    # Single-token answers are what make the task quick to learn; 48 tokens is the demo's budget.
    for item in (item for items in CATEGORIES.values() for item in items):
        assert len(tokenizer(" " + item, add_special_tokens=False).input_ids) == 1, item
    longest = max(len(tokenizer(row["prompt"] + row[key]).input_ids) + 1
                  for row in make_pairs(1000, 0, "train") for key in ("chosen", "rejected"))
    assert longest <= 48


def test_prompt_tokens_are_a_prefix_of_prompt_plus_response(tokenizer):
    for row in make_pairs(200, 0, "heldout"):
        prompt_ids = tokenizer(row["prompt"]).input_ids
        for key in ("chosen", "rejected"):
            assert tokenizer(row["prompt"] + row[key]).input_ids[:len(prompt_ids)] == prompt_ids


def test_chat_template_renders_like_the_plain_prompts(tokenizer):
    row = make_pairs(1, 0, "train")[0]
    question = row["prompt"].removeprefix("Question: ").removesuffix(" Answer:")
    user = [{"role": "user", "content": question}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt_ids == tokenizer(row["prompt"]).input_ids
    full = user + [{"role": "assistant", "content": row["chosen"].lstrip()}]
    full_ids = tokenizer.apply_chat_template(full, return_dict=True)["input_ids"]
    assert full_ids == tokenizer(row["prompt"] + row["chosen"]).input_ids + [tokenizer.eos_token_id]
