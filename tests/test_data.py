"""Preference data: formats, TRL-style tokenization, truncation, bad rows, the fingerprint cache, order, collation.

Expected token ids are computed here by calling the tokenizer directly (the TRL recipe written out), never
through PairTokenizer.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import math
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_ds import data as D
from dpo_ds.data import rows as rows_module, store, tokenize as tokenize_module
from dpo_ds.data.examples import STAT_KEYS
from dpo_ds.data import DataError, PairSampler, PairTokenizer, TokenizedPairs, collate, load_pairs, tokenize_file

BOS, EOS, PAD = 1, 2, 3  # the demo tokenizer's special ids (Llama layout, pad of its own)


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok(demo_assets):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (BOS, EOS, PAD)
    return t


@pytest.fixture(scope="module")
def demo_rows(demo_assets) -> list[dict]:
    return [json.loads(line) for line in Path(demo_assets.train_file).read_text().splitlines()]


def write_jsonl(path: Path, rows: list) -> str:
    """Rows may be dicts (dumped) or raw strings (written as they are, for invalid JSON / blank lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_dataset_dir(path: Path, rows: list[dict]) -> str:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def trl_ids(tok, prompt: str, completion: str, templated: bool = False) -> tuple[list[int], list[int], bool]:
    """TRL's recipe, spelled out: ids(prompt), ids(prompt + completion) on whole strings, completion = tail after
    len(ids(prompt)), EOS appended when missing. Returns (prompt ids, completion ids, prompt-was-a-prefix)."""
    p = tok(prompt, add_special_tokens=not templated)["input_ids"]
    full = tok(prompt + completion, add_special_tokens=not templated)["input_ids"]
    tail = full[len(p):]
    if not tail or tail[-1] != tok.eos_token_id:
        tail = tail + [tok.eos_token_id]
    return p, tail, full[: len(p)] == p


def tokenize(path: str, tok, max_length: int = 512, max_prompt_length=None, skip_bad_rows=False) -> TokenizedPairs:
    return tokenize_file(path, PairTokenizer(tok, max_length, max_prompt_length), skip_bad_rows)


def as_lists(pairs: TokenizedPairs) -> list[tuple[list[int], list[int], list[int]]]:
    return [(pairs.prompt[i].tolist(), pairs.chosen[i].tolist(), pairs.rejected[i].tolist()) for i in range(len(pairs))]


def assert_same_pairs(a: TokenizedPairs, b: TokenizedPairs) -> None:
    assert as_lists(a) == as_lists(b)


# ----------------------------------------------------------------------------------- tokenization
def test_string_rows_tokenize_like_trl(tmp_path, tok, demo_rows):
    rows = demo_rows[:24]
    pairs = tokenize(write_jsonl(tmp_path / "train.jsonl", rows), tok)
    assert len(pairs) == len(rows) and pairs.stats["rows"] == len(rows)
    assert list(pairs.pair_ids) == [f"{tmp_path / 'train.jsonl'}:{i + 1}" for i in range(len(rows))]
    for i, row in enumerate(rows):
        p, c, _ = trl_ids(tok, row["prompt"], row["chosen"])
        _, r, _ = trl_ids(tok, row["prompt"], row["rejected"])
        assert (pairs.prompt[i].tolist(), pairs.chosen[i].tolist(), pairs.rejected[i].tolist()) == (p, c, r)
        # and independently of the recipe: one BOS in front, one EOS at the end, the text round-trips
        assert pairs.prompt[i].tolist()[0] == BOS and BOS not in pairs.prompt[i].tolist()[1:]
        for comp, text in ((pairs.chosen[i].tolist(), row["chosen"]), (pairs.rejected[i].tolist(), row["rejected"])):
            assert comp[-1] == EOS and EOS not in comp[:-1]
            assert tok.decode(pairs.prompt[i].tolist() + comp, skip_special_tokens=True) == row["prompt"] + text
    assert pairs.stats == dict.fromkeys(STAT_KEYS, 0) | {"rows": 24}


def test_eos_not_doubled_when_the_completion_already_ends_with_it(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Question: hi Answer:", "chosen": " Try apple." + tok.eos_token,
                                               "rejected": " Try cat."}])
    pairs = tokenize(path, tok)
    assert pairs.chosen[0].tolist()[-1] == EOS and pairs.chosen[0].tolist()[-2] != EOS
    assert pairs.chosen[0].tolist() == trl_ids(tok, "Question: hi Answer:", " Try apple." + tok.eos_token)[1]
    assert pairs.rejected[0].tolist() == trl_ids(tok, "Question: hi Answer:", " Try cat.")[1]


def test_conversational_rows_use_the_chat_template(tmp_path, tok):
    user = {"role": "user", "content": "Bob asks: can you name a fruit?"}
    sys_msg = {"role": "system", "content": "Be brief."}
    rows = [
        # explicit prompt messages
        {"prompt": [sys_msg, user], "chosen": [{"role": "assistant", "content": "Try apple."}],
         "rejected": [{"role": "assistant", "content": "Try cat."}]},
        # explicit string prompt with message completions: the string is the user turn
        {"prompt": user["content"], "chosen": [{"role": "assistant", "content": "Try plum."}],
         "rejected": [{"role": "assistant", "content": "Try dog."}]},
        # implicit prompt: the shared leading messages
        {"chosen": [user, {"role": "assistant", "content": "Try lemon."}],
         "rejected": [user, {"role": "assistant", "content": "Try wolf."}]},
    ]
    pairs = tokenize(write_jsonl(tmp_path / "chat.jsonl", rows), tok)
    prompts = [[sys_msg, user], [user], [user]]
    answers = [("Try apple.", "Try cat."), ("Try plum.", "Try dog."), ("Try lemon.", "Try wolf.")]
    for i, (prompt_msgs, (good, bad)) in enumerate(zip(prompts, answers)):
        prompt_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        expected = []
        for answer in (good, bad):
            full = tok.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": answer}], tokenize=False)
            assert full.startswith(prompt_text)
            expected.append(trl_ids(tok, prompt_text, full[len(prompt_text):], templated=True))
        assert pairs.prompt[i].tolist() == expected[0][0]
        assert (pairs.chosen[i].tolist(), pairs.rejected[i].tolist()) == (expected[0][1], expected[1][1])
    # written out by hand from the demo template: generation prompt on the prompt, EOS closing the answer
    # the prompt carries the generation prompt; the completion is the assistant turn closed by EOS
    prompt_text = tok.decode(pairs.prompt[1].tolist())
    assert prompt_text == tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert user["content"] in prompt_text and not prompt_text.rstrip().endswith("?")
    assert tok.decode(pairs.chosen[2].tolist()).strip() == "Try lemon." + tok.eos_token
    assert pairs.prompt[1].tolist()[0] == BOS and BOS not in pairs.prompt[1].tolist()[1:]  # no second BOS from add_special_tokens
    assert pairs.chosen[2].tolist()[-1] == EOS and EOS not in pairs.chosen[2].tolist()[:-1]  # the template's EOS, not doubled
    assert pairs.stats["prompt_not_prefix"] == 0


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet, write_dataset_dir], ids=["jsonl", "parquet", "dir"])
def test_formats_give_identical_ids(tmp_path, tok, demo_rows, writer):
    rows = demo_rows[:16]
    ref = tokenize(write_jsonl(tmp_path / "ref.jsonl", rows), tok)
    name = {"write_jsonl": "t.jsonl", "write_parquet": "t.parquet", "write_dataset_dir": "t_dir"}[writer.__name__]
    path = writer(tmp_path / name, rows)
    pairs = tokenize(path, tok)
    assert_same_pairs(pairs, ref)
    assert len(pairs) == 16
    if writer is not write_jsonl:
        assert pairs.pair_ids[2] == f"{path}:row 3"


@pytest.mark.parametrize("writer", [write_parquet, write_dataset_dir], ids=["parquet", "dir"])
def test_conversational_columnar_formats(tmp_path, tok, writer):
    user = {"role": "user", "content": "Name a tool."}
    rows = [{"chosen": [user, {"role": "assistant", "content": f"Try {good}."}],
             "rejected": [user, {"role": "assistant", "content": f"Try {bad}."}]}
            for good, bad in (("saw", "cat"), ("axe", "red"))]
    ref = tokenize(write_jsonl(tmp_path / "ref.jsonl", rows), tok)
    pairs = tokenize(writer(tmp_path / "chat.parquet" if writer is write_parquet else tmp_path / "chat_dir", rows), tok)
    assert_same_pairs(pairs, ref)
    assert tok.decode(pairs.chosen[0].tolist()).strip() == "Try saw.</s>"


def test_implicit_prompt_strings(tmp_path, tok, demo_rows):
    # whitespace boundary: the prompt never ends inside a word, and the completions keep their leading space
    row = D.validate_row("x:1", {"chosen": "The answer is yes", "rejected": "The answer is yet"})
    assert (row.prompt, row.chosen, row.rejected) == ("The answer is", " yes", " yet")
    row = D.validate_row("x:1", {"chosen": "Pick:\n apple", "rejected": "Pick:\n apricot"})
    assert (row.prompt, row.chosen, row.rejected) == ("Pick:", "\n apple", "\n apricot")
    row = D.validate_row("x:1", {"chosen": "apple pie", "rejected": "apricot pie"})
    assert (row.prompt, row.chosen, row.rejected) == ("", "apple pie", "apricot pie")

    # on the demo data, an implicit prompt gives the same full sequences as the explicit one, and its ids
    # stay a prefix (no completion word is lost to a token merged across the boundary)
    rows = demo_rows[:16]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    pairs = tokenize(write_jsonl(tmp_path / "implicit.jsonl", implicit), tok)
    assert pairs.stats["prompt_not_prefix"] == 0
    for i, r in enumerate(implicit):
        for comp, text in ((pairs.chosen[i].tolist(), r["chosen"]), (pairs.rejected[i].tolist(), r["rejected"])):
            assert pairs.prompt[i].tolist() + comp == tok(text)["input_ids"] + [EOS]
        assert pairs.chosen[i].tolist() != pairs.rejected[i].tolist()
        # the prompt stops before the first differing word
        differing = {w for w in rows[i]["chosen"].split()} ^ {w for w in rows[i]["rejected"].split()}
        assert not differing & set(tok.decode(pairs.prompt[i].tolist(), skip_special_tokens=True).split())


def test_implicit_prompt_messages():
    sys_msg, user = {"role": "system", "content": "s"}, {"role": "user", "content": "u"}
    a1, a2 = {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}
    row = D.validate_row("x:1", {"chosen": [sys_msg, user, a1], "rejected": [sys_msg, user, a2]})
    assert (row.prompt, row.chosen, row.rejected) == ([sys_msg, user], [a1], [a2])
    # multi-turn: everything shared is prompt, even a shared assistant turn
    row = D.validate_row("x:1", {"chosen": [user, a1, user, a1], "rejected": [user, a1, user, a2]})
    assert (row.prompt, row.chosen, row.rejected) == ([user, a1, user], [a1], [a2])


def merged_words(tok, count: int) -> list[str]:
    """Words that are one token of the vocab: split inside, their halves merge across the prompt boundary."""
    words = sorted(p[1:] for p in tok.get_vocab() if p.startswith("\u2581") and p[1:].isalpha() and len(p) >= 6)
    return words[:count]


def test_prompt_not_prefix_is_counted_and_warned_once(tmp_path, tok):
    # "... hamm" + "er now" becomes "... hammer now": ids(prompt) is not a prefix of ids(prompt + completion)
    merged = [{"prompt": f"Question: x Answer: {w[:3]}", "chosen": f"{w[3:]} now", "rejected": f"{w[3:]} then"}
              for w in merged_words(tok, 2)]
    clean = {"prompt": "Question: x Answer:", "chosen": " Try saw.", "rejected": " Try cat."}
    rows = [merged[0], clean, merged[1], clean]
    for r in merged:
        assert not trl_ids(tok, r["prompt"], r["chosen"])[2]  # the premise of this test
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dpo_ds")
    logger.addHandler(handler)
    try:
        path = write_jsonl(tmp_path / "merge.jsonl", rows)
        pairs = tokenize(path, tok)
    finally:
        logger.removeHandler(handler)
    assert pairs.stats["prompt_not_prefix"] == 2 and len(pairs) == 4
    for i, r in enumerate(rows):  # still the TRL tail after len(ids(prompt)), never empty
        p, c, _ = trl_ids(tok, r["prompt"], r["chosen"])
        assert (pairs.prompt[i].tolist(), pairs.chosen[i].tolist()) == (p, c) and len(c) >= 1
    warnings = [r for r in records if r.levelno == logging.WARNING and "prefix" in r.getMessage()]
    assert len(warnings) == 1
    assert re.search(r"\b2\b", warnings[0].getMessage().replace(path, ""))


# ------------------------------------------------------------------------------------- truncation
def test_truncation_never_leaves_a_pair_without_completion(tmp_path, tok, demo_rows):
    rows = demo_rows[:32]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    full = tokenize(path, tok)
    prompt_lens = [len(p) for p in full.prompt]
    cut = sorted(prompt_lens)[len(prompt_lens) // 2]  # drops the longer half, keeps the rest
    for max_length in (cut, cut + 1, cut + 3, max(prompt_lens) + 2):
        pairs = tokenize(path, tok, max_length=max_length)
        dropped = [i for i, n in enumerate(prompt_lens) if n >= max_length]  # prompt fills max_length
        assert pairs.stats["dropped_truncated"] == len(dropped)
        # completions cut to the same ids carry no preference: skipped and counted (the demo's differ late)
        same = [i for i in range(len(rows)) if i not in dropped and
                full.chosen[i].tolist()[:max_length - prompt_lens[i]] == full.rejected[i].tolist()[:max_length - prompt_lens[i]]]
        assert pairs.stats["identical_completions"] == pairs.stats["identical_after_truncation"] == len(same)
        kept = [i for i in range(len(rows)) if i not in dropped and i not in same]
        assert list(pairs.pair_ids) == [full.pair_ids[i] for i in kept]
        for j, i in enumerate(kept):
            room = max_length - prompt_lens[i]
            assert pairs.prompt[j].tolist() == full.prompt[i].tolist()
            assert pairs.chosen[j].tolist() == full.chosen[i].tolist()[:room] and pairs.rejected[j].tolist() == full.rejected[i].tolist()[:room]
            assert 1 <= len(pairs.chosen[j].tolist()) and 1 <= len(pairs.rejected[j].tolist())
            assert pairs.length(j) <= max_length
    assert tokenize(path, tok, max_length=cut).stats["dropped_truncated"] > 0  # the loop above did drop some


def test_truncation_boundary_and_all_dropped(tmp_path, tok):
    row = {"prompt": "Question: Bob asks: can you name a fruit? Answer:", "chosen": " Try apple.", "rejected": " No cat."}
    p, c, _ = trl_ids(tok, row["prompt"], row["chosen"])
    path = write_jsonl(tmp_path / "one.jsonl", [row, row | {"chosen": " Try plum."}])
    pairs = tokenize(path, tok, max_length=len(p) + 1)  # room for exactly one completion token
    assert pairs.prompt[0].tolist() == p and pairs.chosen[0].tolist() == c[:1] and len(pairs.rejected[0].tolist()) == 1
    with pytest.raises(DataError, match="no usable"):  # prompt fills max_length: both dropped, nothing left
        tokenize(path, tok, max_length=len(p))


def test_max_prompt_length_keeps_the_last_tokens(tmp_path, tok, demo_rows):
    rows = demo_rows[:16]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    full = tokenize(path, tok)
    n = min(len(x) for x in full.prompt) - 3
    assert n >= 2
    pairs = tokenize(path, tok, max_length=n + 4, max_prompt_length=n)
    assert pairs.stats["dropped_truncated"] == 0 and len(pairs) == len(rows)
    for i in range(len(rows)):
        assert pairs.prompt[i].tolist() == full.prompt[i].tolist()[-n:]
        assert pairs.chosen[i].tolist() == full.chosen[i].tolist()[:4] and pairs.rejected[i].tolist() == full.rejected[i].tolist()[:4]
    # a max_prompt_length that fills max_length drops the pairs instead of emitting no completion
    with pytest.raises(DataError, match="no usable"):
        tokenize(path, tok, max_length=n, max_prompt_length=n)


# --------------------------------------------------------------------------------------- bad rows
GOOD = {"prompt": "Question: x Answer:", "chosen": " Try saw.", "rejected": " Try cat."}
BAD_CASES = [  # (raw row, field named in the message or None, words the message must contain)
    ('{"prompt": "q", "chosen": "a", ', None, "JSON"),
    ({"prompt": "q", "rejected": " b"}, "chosen", "missing"),
    ({"prompt": "q", "chosen": " a"}, "rejected", "missing"),
    ({"prompt": "q", "chosen": 5, "rejected": " b"}, "chosen", None),
    ({"prompt": "q", "chosen": " a", "rejected": ["x"]}, "rejected", None),
    ({"prompt": 7, "chosen": " a", "rejected": " b"}, "prompt", None),
    ({"prompt": "q", "chosen": "   ", "rejected": " b"}, "chosen", "empty"),
    ({"prompt": "q", "chosen": " a", "rejected": ""}, "rejected", "empty"),
    ({"prompt": "q", "chosen": " same", "rejected": " same"}, "rejected", None),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant"}]}, "rejected", None),
]


@pytest.mark.parametrize("bad,field_name,words", BAD_CASES, ids=[
    "invalid_json", "missing_chosen", "missing_rejected", "int_chosen", "list_rejected", "int_prompt",
    "blank_chosen", "empty_rejected", "identical", "message_without_content"])
def test_bad_row_error_names_file_line_and_field(tmp_path, tok, bad, field_name, words):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", bad, GOOD])  # line 2 is blank: the bad row is line 3
    with pytest.raises(DataError) as info:
        tokenize(path, tok)
    msg = str(info.value)
    assert f"{path}:3:" in msg
    if field_name:
        assert f"field '{field_name}'" in msg
    if words:
        assert words in msg
    pairs = tokenize(path, tok, skip_bad_rows=True)
    assert pairs.stats["skipped_bad_rows"] == 1 and pairs.stats["rows"] == 3
    assert list(pairs.pair_ids) == [f"{path}:1", f"{path}:4"]


@pytest.mark.parametrize("writer", [write_parquet, write_dataset_dir], ids=["parquet", "dir"])
def test_bad_row_in_columnar_formats(tmp_path, tok, writer):
    rows = [GOOD, GOOD, {"prompt": "q", "chosen": None, "rejected": " b"}, GOOD]
    path = writer(tmp_path / ("t.parquet" if writer is write_parquet else "t_dir"), rows)
    with pytest.raises(DataError) as info:
        tokenize(path, tok)
    assert f"{path}:row 3: field 'chosen': missing" in str(info.value)
    pairs = tokenize(path, tok, skip_bad_rows=True)
    assert pairs.stats["skipped_bad_rows"] == 1 and len(pairs) == 3


def test_json_error_column_with_byte_order_mark_and_indent(tmp_path, tok):
    """Issue 24 item 6: a file starting with a UTF-8 byte order mark (Windows editors write one) failed on its
    valid first line ("Unexpected UTF-8 BOM", column 1); the BOM is not part of the data. An error's column
    counts the line's characters from 1, leading spaces included (30 below: the `x` after `"chosen": `)."""
    path = tmp_path / "train.jsonl"
    bad = '   {"prompt": "q", "chosen": x}'
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n" + bad + "\n").encode())
    with pytest.raises(DataError) as info:
        tokenize(str(path), tok)
    assert str(info.value) == f"{path}:2: invalid JSON: Expecting value (column {bad.index('x') + 1})"


def test_skip_bad_rows_counts_every_case(tmp_path, tok):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD] + [b for b, _, _ in BAD_CASES] + [GOOD])
    pairs = tokenize(path, tok, skip_bad_rows=True)
    assert pairs.stats["skipped_bad_rows"] == len(BAD_CASES)
    assert pairs.stats["rows"] == len(BAD_CASES) + 2
    assert list(pairs.pair_ids) == [f"{path}:1", f"{path}:{len(BAD_CASES) + 2}"]
    with pytest.raises(DataError, match="no usable"):
        tokenize(write_jsonl(tmp_path / "all_bad.jsonl", [b for b, _, _ in BAD_CASES]), tok, skip_bad_rows=True)


def test_missing_data_file(tmp_path, tok):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        tokenize(str(tmp_path / "nope.jsonl"), tok)


# ------------------------------------------------------------------------------------------- cache
def _load(path, tok, cache_dir, **kw):
    # one tokenizer in this process: these tests are about the cache; the parallel workers have their own tests
    args = dict(max_length=512, max_prompt_length=None, skip_bad_rows=False, cache_dir=str(cache_dir), workers=1)
    return load_pairs(path, tok, **{**args, **kw})


def test_cache_is_written_once_and_reused(tmp_path, tok, demo_rows, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:24])
    caches = tmp_path / "caches"
    first, fp = _load(path, tok, caches)
    assert D.cache_problem(D.cache_path(caches, fp), fp) is None
    assert_same_pairs(first, tokenize(path, tok))

    def boom(*a, **k):
        raise AssertionError("tokenized_chunks called although the cache exists")

    monkeypatch.setattr(store, "tokenized_chunks", boom)
    again, fp2 = _load(path, tok, caches)
    assert fp2 == fp
    assert_same_pairs(again, first)
    assert list(again.pair_ids) == list(first.pair_ids) and again.stats == first.stats
    # without a cache dir it does tokenize (so the monkeypatch above is what stopped it)
    with pytest.raises(AssertionError, match="tokenized_chunks called"):
        load_pairs(path, tok, max_length=512, max_prompt_length=None, skip_bad_rows=False, cache_dir=None, workers=1)


def test_cache_keeps_stats_and_truncation(tmp_path, tok, demo_rows):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:24] + ['{"oops'])
    caches = tmp_path / "caches"
    fresh, _ = _load(path, tok, caches, max_length=20, max_prompt_length=17, skip_bad_rows=True)
    cached, _ = _load(path, tok, caches, max_length=20, max_prompt_length=17, skip_bad_rows=True)
    assert_same_pairs(cached, fresh)
    assert cached.stats == fresh.stats and cached.stats["skipped_bad_rows"] == 1


def test_fingerprint_changes_with_inputs(tmp_path, tok, demo_rows, demo_assets):
    from transformers import AutoTokenizer

    path = tmp_path / "train.jsonl"
    write_jsonl(path, demo_rows[:8])
    caches = tmp_path / "caches"
    base, fp = _load(str(path), tok, caches)
    assert D.data_fingerprint(str(path), AutoTokenizer.from_pretrained(demo_assets.model_dir), 512, None, False) == fp

    fps = {fp}
    for kw in ({"max_length": 511}, {"max_prompt_length": 64}, {"skip_bad_rows": True}):
        fps.add(_load(str(path), tok, caches, **kw)[1])
    tokenizers = []
    t = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    t.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizers.append(t)
    t = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    t.add_tokens(["zzzq"])
    tokenizers.append(t)
    tokenizers.append(AutoTokenizer.from_pretrained(demo_assets.model_dir, add_bos_token=False))  # same vocab
    for t in tokenizers:
        pairs, fp_t = _load(str(path), t, caches)
        fps.add(fp_t)
    assert pairs.prompt[0].tolist()[0] != BOS  # the add_bos_token=False tokenizer got its own ids, not the stale cache
    assert len(fps) == 7

    # changing the data file: a new fingerprint, and the new content is what loads
    write_jsonl(path, demo_rows[1:9])
    changed, fp_changed = _load(str(path), tok, caches)
    assert fp_changed not in fps
    assert changed.prompt[0].tolist() == base.prompt[1].tolist()
    assert len(list(caches.glob("pairs-*.v2"))) == 8


def test_data_error_of_a_preparation_names_the_row(tmp_path, tok):
    """Rank 0's error (raised on the other ranks by Parallel.on_rank0: tests/test_comm.py) names file, line and
    field, and leaves no cache behind."""
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"prompt": "q", "rejected": " b"}])
    caches = tmp_path / "caches"
    with pytest.raises(DataError) as rank0:
        _load(path, tok, caches)
    assert f"{path}:2: field 'chosen': missing" in str(rank0.value)
    assert not list(caches.glob("pairs-*"))


# ----------------------------------------------------------------------------------------- sampler
def sampler(n, b, ga, ws, shuffle=False, group=False, seed=0, lengths=None) -> PairSampler:
    return PairSampler(lengths if lengths is not None else [10] * n, b, ga, ws, shuffle, group, seed)


def step_pairs(s: PairSampler, step: int) -> list[int]:
    """Pairs of one optimizer step, in (micro-step, rank) order, checking every micro-batch has B pairs."""
    out = []
    for m in range(s.grad_accum):
        for r in range(s.data_parallel_size):
            mb = s.micro_batches(step, r)[m]
            assert len(mb) == s.micro_batch_size
            out += mb
    return out


@pytest.mark.parametrize("ws", [1, 2, 4])
@pytest.mark.parametrize("b,ga", [(1, 1), (2, 3), (3, 2), (4, 1), (1, 4)])
def test_in_order_steps_consume_consecutive_blocks(ws, b, ga):
    g = b * ga * ws
    n = 6 * g - 1  # a partial block at the end (when G > 1): never used
    s = sampler(n, b, ga, ws)
    assert s.pairs_per_step == g and s.steps_per_epoch == 5
    for k in range(5):
        assert sorted(step_pairs(s, k)) == list(range(k * g, (k + 1) * g))
        # the documented layout: micro-step m on rank r takes B consecutive positions at (m*W + r)*B
        for r in range(ws):
            for m, mb in enumerate(s.micro_batches(k, r)):
                start = k * g + (m * ws + r) * b
                assert mb == list(range(start, start + b))
    # the next epoch starts over from the beginning
    assert sorted(step_pairs(s, 5)) == list(range(g))
    assert s.state(7) == {"epoch": 1, "step_in_epoch": 2, "consumed_pairs": 7 * g}


def test_shuffle_is_a_seeded_permutation_per_epoch():
    b, ga, ws = 2, 2, 2
    n = 64
    s = sampler(n, b, ga, ws, shuffle=True, seed=3)
    epochs = [[i for k in range(e * 8, (e + 1) * 8) for i in step_pairs(s, k)] for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(n))  # a permutation: every pair exactly once
        assert order == s.epoch_order(e)  # step k takes positions [k*G, (k+1)*G) of the epoch order
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(n))
    again = sampler(n, b, ga, ws, shuffle=True, seed=3)
    assert [step_pairs(again, k) for k in range(24)] == [step_pairs(s, k) for k in range(24)]
    other = sampler(n, b, ga, ws, shuffle=True, seed=4)
    assert [step_pairs(other, k) for k in range(8)] != [step_pairs(s, k) for k in range(8)]
    # the micro-batches of a step are disjoint across ranks
    for k in range(8):
        per_rank = [set(i for mb in s.micro_batches(k, r) for i in mb) for r in range(ws)]
        assert not per_rank[0] & per_rank[1]


@pytest.mark.parametrize("shuffle", [False, True])
def test_group_by_length(shuffle):
    gen = torch.Generator().manual_seed(0)
    n, b, ga, ws = 1000, 4, 2, 2
    lengths = torch.randint(1, 400, (n,), generator=gen).tolist()

    def spread_and_used(s: PairSampler, epoch: int):
        spreads, used = [], []
        for k in range(epoch * s.steps_per_epoch, (epoch + 1) * s.steps_per_epoch):
            for r in range(ws):
                for mb in s.micro_batches(k, r):
                    spreads.append(max(lengths[i] for i in mb) - min(lengths[i] for i in mb))
                    used += mb
        return statistics.mean(spreads), used

    grouped = sampler(n, b, ga, ws, shuffle=shuffle, group=True, seed=1, lengths=lengths)
    plain = sampler(n, b, ga, ws, shuffle=True, group=False, seed=1, lengths=lengths)
    random_spread, _ = spread_and_used(plain, 0)
    for epoch in range(2):
        spread, used = spread_and_used(grouped, epoch)
        assert spread < random_spread / 10, (spread, random_spread)
        assert len(used) == len(set(used)) == grouped.steps_per_epoch * grouped.pairs_per_step  # each at most once
        assert sorted(grouped.epoch_order(epoch)) == list(range(n))
    # not a long-to-short (or sorted) run through the epoch: micro-batches are shuffled
    firsts = [grouped.micro_batches(k, 0)[0][0] for k in range(grouped.steps_per_epoch)]
    step_lengths = [lengths[i] for i in firsts]
    assert step_lengths != sorted(step_lengths) and step_lengths != sorted(step_lengths, reverse=True)
    # deterministic for a seed, different for another seed, different across epochs
    same = sampler(n, b, ga, ws, shuffle=shuffle, group=True, seed=1, lengths=lengths)
    assert [same.micro_batches(k, r) for k in range(10) for r in range(ws)] == \
        [grouped.micro_batches(k, r) for k in range(10) for r in range(ws)]
    other = sampler(n, b, ga, ws, shuffle=shuffle, group=True, seed=2, lengths=lengths)
    assert other.epoch_order(0) != grouped.epoch_order(0)
    assert grouped.epoch_order(0) != grouped.epoch_order(1)


# --------------------------------------------------------------------------------------- collation
def test_collate_layout_and_masks():
    pairs = TokenizedPairs(
        prompt=[[1, 10, 11], [1, 12], [1, 13, 14, 15]],
        chosen=[[20, 2], [21, 22, 23, 2], [24, 2]],
        rejected=[[30, 31, 33, 2], [32, 2], [3, 2]],  # 3 == pad id inside a completion: masks go by length
        pair_ids=["f:1", "f:2", "f:3"],
    )
    batch = collate(pairs, [2, 0], pad_id=3)
    P = 3
    assert batch["input_ids"].tolist() == [
        [1, 13, 14, 15, 24, 2, P],   # pair 2, prompt + chosen
        [1, 10, 11, 20, 2, P, P],    # pair 0, prompt + chosen
        [1, 13, 14, 15, 3, 2, P],    # pair 2, prompt + rejected
        [1, 10, 11, 30, 31, 33, 2],  # pair 0, prompt + rejected
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert batch["loss_mask"].long().tolist() == [
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1],
    ]
    # width is the longest sequence of the batch: here prompt+chosen of pair 1
    batch = collate(pairs, [1], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 12, 21, 22, 23, 2], [1, 12, 32, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert batch["loss_mask"].long().tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_tokenized_file(tmp_path, tok, demo_rows):
    pairs = tokenize(write_jsonl(tmp_path / "t.jsonl", demo_rows[:8]), tok)
    idx = [5, 1, 6]
    batch = collate(pairs, idx, pad_id=PAD)
    ids, attn, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"].bool()
    assert ids.shape == (6, max(pairs.length(i) for i in idx))
    for row, (i, comp) in enumerate([(i, pairs.chosen[i].tolist()) for i in idx] + [(i, pairs.rejected[i].tolist()) for i in idx]):
        seq = pairs.prompt[i].tolist() + comp
        assert ids[row, : len(seq)].tolist() == seq and (ids[row, len(seq):] == PAD).all()
        assert ids[row][loss[row]].tolist() == comp
        assert int(attn[row].sum()) == len(seq) and attn[row, : len(seq)].all()
    assert int(attn.sum()) == sum(pairs.real_tokens(i) for i in idx)


# ------------------------------------------------------------------------ parallel preparation, the cache
def mixed_rows(demo_rows: list[dict]) -> list[dict]:
    """Standard, conversational (explicit, string and implicit prompts) and implicit-prompt string rows."""
    user = {"role": "user", "content": "Bob asks: can you name a fruit?"}
    chat = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "Try apple."}],
             "rejected": [{"role": "assistant", "content": "Try cat."}]},
            {"prompt": user["content"], "chosen": [{"role": "assistant", "content": "Try plum."}],
             "rejected": [{"role": "assistant", "content": "Try dog."}]},
            {"chosen": [user, {"role": "assistant", "content": "Try lemon."}],
             "rejected": [user, {"role": "assistant", "content": "Try wolf."}]}]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in demo_rows[20:30]]
    return demo_rows[:20] + chat + implicit


def recipe_ids(tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """The TRL convention written out for one row of mixed_rows (independent of PairTokenizer)."""
    if isinstance(row["chosen"], str):
        prompt = row.get("prompt")
        if prompt is None:  # implicit: the shared text up to the last whitespace before the first difference
            n = len(os.path.commonprefix([row["chosen"], row["rejected"]]))
            n = row["chosen"][:n].rfind(" ")
            prompt, chosen, rejected = row["chosen"][:n], row["chosen"][n:], row["rejected"][n:]
        else:
            chosen, rejected = row["chosen"], row["rejected"]
        p, c, _ = trl_ids(tok, prompt, chosen)
        return p, c, trl_ids(tok, prompt, rejected)[1]
    prompt_msgs = row.get("prompt")
    chosen_msgs, rejected_msgs = row["chosen"], row["rejected"]
    if prompt_msgs is None:
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:-1], chosen_msgs[-1:], rejected_msgs[-1:]
    elif isinstance(prompt_msgs, str):
        prompt_msgs = [{"role": "user", "content": prompt_msgs}]
    prompt_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    out = []
    for msgs in (chosen_msgs, rejected_msgs):
        full = tok.apply_chat_template(prompt_msgs + msgs, tokenize=False)
        out.append(trl_ids(tok, prompt_text, full[len(prompt_text):], templated=True))
    return out[0][0], out[0][1], out[1][1]


@pytest.fixture(scope="module")
def byte_level_tok(demo_rows):
    """A GPT-2-style byte-level BPE with the demo chat template: PairTokenizer encodes its prompts once."""
    from dpo_ds.demo_data import CHAT_TEMPLATE
    from helpers import regex_bpe_tokenizer

    return regex_bpe_tokenizer("gpt2", [r["prompt"] + r["chosen"] + r["rejected"] for r in demo_rows],
                               chat_template=CHAT_TEMPLATE)


@pytest.mark.distributed
@pytest.mark.parametrize("which", ["sentencepiece", "byte-level BPE"])
def test_parallel_preparation_gives_the_recipe_ids_in_file_order(tmp_path, tok, byte_level_tok, demo_rows, monkeypatch,
                                                                 which):
    """Token ids equal the TRL recipe on standard, conversational and implicit-prompt rows, with 1 or 2
    tokenizer processes and chunks smaller than the file (results come back in file order); for the byte-level
    BPE, with prompts encoded once (dpo_ds.data.prompt_reuse) where they have a cut."""
    tok = byte_level_tok if which == "byte-level BPE" else tok
    rows = mixed_rows(demo_rows)
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    monkeypatch.setattr(rows_module, "CHUNK_ROWS", 4)
    expected = [recipe_ids(tok, r) for r in rows]
    pair_tokenizer = PairTokenizer(tok, 512)
    assert (pair_tokenizer.prompt_reuse is not None) == (which == "byte-level BPE")
    if pair_tokenizer.prompt_reuse is not None:  # the fast path is what these rows take
        validated = [D.validate_row("x", r) for r in rows]
        assert pair_tokenizer.encode(validated)[1] > len(rows) // 2
    for workers in (1, 2):
        pairs = tokenize_file(path, pair_tokenizer, False, workers=workers)
        assert as_lists(pairs) == expected
        assert list(pairs.pair_ids) == [f"{path}:{i + 1}" for i in range(len(rows))]
        assert pairs.stats["rows"] == len(rows) and pairs.stats["prompt_not_prefix"] == 0


@pytest.mark.distributed
def test_first_bad_row_in_file_order_with_parallel_workers(tmp_path, tok, demo_rows, monkeypatch):
    monkeypatch.setattr(rows_module, "CHUNK_ROWS", 3)
    rows = demo_rows[:12]
    rows[10] = {"prompt": "q", "chosen": " a"}  # chunk 4
    rows[4] = {"prompt": "q", "chosen": 5, "rejected": " b"}  # chunk 2: the first in file order
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    for workers in (1, 2):
        with pytest.raises(DataError) as info:
            tokenize_file(path, PairTokenizer(tok, 512), False, workers=workers)
        assert str(info.value).startswith(f"{path}:5: field 'chosen':")
        pairs = tokenize_file(path, PairTokenizer(tok, 512), True, workers=workers)
        assert pairs.stats["skipped_bad_rows"] == 2 and len(pairs) == 10


def test_small_file_is_tokenized_without_processes(tmp_path, tok, demo_rows):
    """Issue 24 item 5: a file of one chunk started a pool of forked processes anyway (a unit test: starting one
    fails it, tests/conftest.py)."""
    path = write_jsonl(tmp_path / "small.jsonl", demo_rows[:8])
    pairs = tokenize_file(path, PairTokenizer(tok, 512), False, workers=4)
    assert list(pairs.pair_ids) == [f"{path}:{i + 1}" for i in range(8)]


@pytest.mark.distributed
@pytest.mark.parametrize("ignores_terminate", [False, True])
def test_stuck_tokenizer_process_is_named_and_ended(tmp_path, tok, demo_rows, monkeypatch, ignores_terminate):
    """Issue 24 item 5: the tokenization pool hung the job (a forked worker holding the trainer's SIGTERM handler
    did not heed terminate). Workers now start from a fresh forkserver process with the default SIGTERM; a chunk
    not finished within CHUNK_TIMEOUT_S is named, and the pool's terminate ends the stuck process; one that ignores
    SIGTERM is killed after POOL_END_S (Pool.terminate alone joins it forever)."""
    monkeypatch.setattr(rows_module, "CHUNK_ROWS", 3)
    monkeypatch.setattr(tokenize_module, "CHUNK_TIMEOUT_S", 30)
    monkeypatch.setattr(tokenize_module, "POOL_END_S", 5)
    before = set(multiprocessing.active_children())
    rows = demo_rows[:12]
    rows[7] = {**rows[7], "prompt": "stuck here"}  # line 8: the third chunk, lines 7-9
    path = write_jsonl(tmp_path / "stuck.jsonl", rows)
    from helpers import StuckOnRow  # tests/ is on the path of the test process, not of a module import

    with pytest.raises(DataError) as info:
        tokenize_file(path, StuckOnRow(tok, 512, "stuck here", ignores_terminate), False, workers=2)
    assert str(info.value).startswith(f"{path}:7: rows 7-9 are still being tokenized after 30 s in a tokenizer process")
    assert [p for p in multiprocessing.active_children() if p not in before] == []  # every tokenizer process ended


def test_cache_is_flat_memory_mapped_arrays(tmp_path, tok, demo_rows):
    caches = tmp_path / "caches"
    small, fp_small = _load(write_jsonl(tmp_path / "small.jsonl", demo_rows[:8]), tok, caches)
    pairs, fp = _load(write_jsonl(tmp_path / "big.jsonl", demo_rows * 4), tok, caches)
    cache = D.cache_path(caches, fp)
    assert pairs.cache_path == str(cache)
    for column in (pairs.prompt, pairs.chosen, pairs.rejected):
        # one read-only mapping of the file per column: ids int32, offsets int64 (> 2**31 tokens fit)
        assert isinstance(column.flat, np.memmap) and column.flat.dtype == np.int32 and not column.flat.flags.writeable
        assert isinstance(column.offsets, np.memmap) and column.offsets.dtype == np.int64
        assert len(column) == len(pairs) == 4 * len(demo_rows)
    assert as_lists(pairs)[:8] == as_lists(small)
    assert pairs.stored_tokens == sum(len(p) + len(c) + len(r) for p, c, r in as_lists(pairs))
    # row locations live in the cache files, not in its metadata: meta.json does not grow with the rows
    sizes = [(D.cache_path(caches, f) / "meta.json").stat().st_size for f in (fp_small, fp)]
    assert sizes[1] < sizes[0] + 100
    assert (cache / "rows.i64").stat().st_size == 8 * len(pairs)
    assert pairs.pair_ids[len(pairs) - 1] == f"{tmp_path / 'big.jsonl'}:{len(pairs)}"
    # the sampler works from the lengths array
    from dpo_ds.config import TrainConfig

    lengths = PairSampler.for_config(TrainConfig(micro_batch_size=2), pairs, 2).lengths
    assert lengths.tolist() == [pairs.length(i) for i in range(len(pairs))]


@pytest.mark.parametrize("damage", ["truncated_ids", "no_meta", "other_fingerprint", "bad_offsets"])
def test_damaged_cache_is_named_and_rebuilt_never_used(tmp_path, tok, demo_rows, damage, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:16])
    caches = tmp_path / "caches"
    good, fp = _load(path, tok, caches)
    expected = as_lists(good)
    cache = D.cache_path(caches, fp)
    if damage == "truncated_ids":
        with open(cache / "chosen.ids", "r+b") as fh:
            fh.truncate(fh.seek(0, 2) - 4)
    elif damage == "no_meta":
        (cache / "meta.json").unlink()
    elif damage == "other_fingerprint":
        meta = json.loads((cache / "meta.json").read_text())
        (cache / "meta.json").write_text(json.dumps(meta | {"fingerprint": "0" * 24}))
    else:
        offsets = np.fromfile(cache / "prompt.offsets", dtype="<i8")
        offsets[3] = offsets[-1] + 5
        offsets.tofile(cache / "prompt.offsets")
    assert D.cache_problem(cache, fp) is not None
    del good
    with caplog.at_level(logging.WARNING, logger="dpo_ds"):
        rebuilt, _ = _load(path, tok, caches)
    assert any(str(cache) in r.getMessage() and "preparing it again" in r.getMessage() for r in caplog.records)
    assert as_lists(rebuilt) == expected and D.cache_problem(cache, fp) is None
    assert [p.name for p in caches.iterdir()] == [cache.name]  # no temporary directory left behind


def test_truncation_report_suggests_lengths(tmp_path, tok, demo_assets, caplog):
    """Issue 13: a max_length as long as the longest prompt drops or cuts most demo pairs; the warning says how many, shows
    the percentiles and the max_length / max_prompt_length that keep 99% whole; `prepare` prints them too."""
    rows = [json.loads(line) for line in Path(demo_assets.train_file).read_text().splitlines()]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    full = as_lists(tokenize(path, tok))
    prompt_lens = sorted(len(p) for p, _, _ in full)
    pair_lens = sorted(len(p) + max(len(c), len(r)) for p, c, r in full)
    p99 = lambda v: v[math.ceil(0.99 * (len(v) - 1))]  # noqa: E731  ("higher" quantile)
    max_length = prompt_lens[-1]
    with caplog.at_level(logging.WARNING, logger="dpo_ds"):
        pairs = tokenize(path, tok, max_length=max_length)
    s = pairs.stats
    dropped = sum(len(p) >= max_length for p, _, _ in full)
    cut = sum(len(p) < max_length and len(p) + max(len(c), len(r)) > max_length for p, c, r in full)
    assert s["dropped_truncated"] == dropped > 0 and s["truncated"] + s["identical_after_truncation"] == cut > 0
    message = next(r.getMessage() for r in caplog.records if "truncation dropped" in r.getMessage())
    assert f"dropped {dropped} and cut {s['truncated']} of {len(rows)} pairs" in message
    assert f"max_length {p99(pair_lens)} with max_prompt_length {p99(prompt_lens)} would keep 99%" in message
    assert re.search(rf"prompt\s+{prompt_lens[len(prompt_lens) // 2]}\s", message.replace("prompt +", "x"))
    # nothing to report when truncation touches no pair
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpo_ds"):
        tokenize(path, tok, max_length=p99(pair_lens) + max(pair_lens))
    assert not [r for r in caplog.records if "truncation" in r.getMessage()]


def test_identical_completion_ids_are_counted_and_skipped(tmp_path, tok, caplog):
    """Issue 13: digits this tokenizer maps to <unk> make ' Try 7.' and ' Try 8.' the same ids: zero signal."""
    same = {"prompt": "Question: pick a number Answer:", "chosen": " Try 7.", "rejected": " Try 8."}
    assert trl_ids(tok, same["prompt"], same["chosen"]) == trl_ids(tok, same["prompt"], same["rejected"])
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, same, GOOD, same, same])
    with caplog.at_level(logging.WARNING, logger="dpo_ds"):
        pairs = tokenize(path, tok)
    assert list(pairs.pair_ids) == [f"{path}:1", f"{path}:3"]
    assert pairs.stats["identical_completions"] == 3 and pairs.stats["identical_after_truncation"] == 0
    warning = next(r.getMessage() for r in caplog.records if "same token ids" in r.getMessage())
    assert "skipped 3 pairs" in warning and path in warning


# ---------------------------------------------------------------------------------- chat template endings
CHAT_TEMPLATES = {  # name -> (template, end-of-turn token, EOS of the instruct model, EOS of the base model)
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>", "<|endoftext|>"),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
               "<|end_header_id|>\n\n{% endif %}", "<|eot_id|>", "<|end_of_text|>"),
    "gemma": ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
              "<start_of_turn>model\n{% endif %}", "<end_of_turn>", "<eos>"),
}


@pytest.mark.parametrize("eos_is_end_of_turn", [True, False], ids=["instruct_eos", "base_eos"])
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_templated_completions_end_with_exactly_one_end_of_turn_token(name, eos_is_end_of_turn):
    """Issue 25 item 7: with ChatML's newline after <|im_end|>, completions ended `<|im_end|>\\n<|im_end|>` (EOS
    appended after the template's own end). A completion ends with the template's end-of-turn token, once, and
    nothing after it; EOS is not appended when that token closes it."""
    from helpers import regex_bpe_tokenizer

    template, end, base_eos = CHAT_TEMPLATES[name]
    words = "the model answers with a fruit apple plum pear name one please try".split()
    tok = regex_bpe_tokenizer("gpt2", [" ".join(words)] * 4, chat_template=template)
    markers = ["<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", end, base_eos]
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.eos_token = end if eos_is_end_of_turn else base_eos
    end_id = tok.convert_tokens_to_ids(end)
    user = {"role": "user", "content": "name one fruit please"}
    row = D.validate_row("x:1", {"prompt": [user], "chosen": [{"role": "assistant", "content": "try apple"}],
                                 "rejected": [{"role": "assistant", "content": "try plum"}]})
    (prompt_ids, chosen, rejected, _), = PairTokenizer(tok, 512).encode([row])[0]
    prompt_text = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    for ids, answer in ((chosen, "try apple"), (rejected, "try plum")):
        assert ids[-1] == end_id and end_id not in ids[:-1]
        assert tok.eos_token_id not in ids[:-1]  # no EOS after (or before) the end-of-turn token
        full = tok.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False)
        assert tok.decode(prompt_ids + ids) == full.rstrip()  # the template's text, its trailing whitespace cut
        assert tok.decode(prompt_ids) == prompt_text
