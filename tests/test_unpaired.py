"""Unpaired examples (KTO): paired data split into desirable and undesirable examples, each scored with a
mismatched completion for the KL reference point; the unit seam (data.for_unit)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_ds.data import DataError, TokenizedPairs, TokenizedUnpaired, collate, for_unit

pytestmark = pytest.mark.unit

PAIRS = TokenizedPairs(prompt=[[1, 5, 6], [1, 7], [1, 9, 9, 9]], chosen=[[8, 9, 2], [10, 2], [11, 12, 2]],
                       rejected=[[11, 2], [12, 4, 5, 2], [13, 2]], pair_ids=["f:1", "f:2", "f:4"], fingerprint="abc")


def test_split_pairs_gives_a_desirable_and_an_undesirable_example_per_pair_with_a_mismatched_completion():
    """Examples 2k (chosen, desirable) and 2k + 1 (rejected, undesirable) of pair k, in pair order; the mismatched
    completion of example i is example i - 2's completion (the previous pair's, same side; cyclic) after example
    i's own prompt."""
    u = for_unit(PAIRS, "unpaired", "f", "kto")
    assert isinstance(u, TokenizedUnpaired) and len(u) == 6
    assert u.labels.tolist() == [True, False] * 3
    completions = [PAIRS.chosen[0], PAIRS.rejected[0], PAIRS.chosen[1], PAIRS.rejected[1], PAIRS.chosen[2],
                   PAIRS.rejected[2]]
    for i in range(6):
        prompt, completion = u.sequence(0, i)
        assert prompt.tolist() == PAIRS.prompt[i // 2].tolist() and completion.tolist() == completions[i].tolist()
        prompt_kl, mismatched = u.sequence(1, i)
        assert prompt_kl.tolist() == prompt.tolist() and mismatched.tolist() == completions[(i - 2) % 6].tolist()
        assert u.length(i) == max(len(prompt) + len(completion), len(prompt) + len(mismatched))
    assert u.lengths().tolist() == [u.length(i) for i in range(6)]
    assert [u.pair_ids[i] for i in (0, 3)] == ["f:1 (chosen)", "f:2 (rejected)"]
    assert u.fingerprint != PAIRS.fingerprint  # a reference cache of the pairs is not one of these examples
    batch = collate(u, [2, 3], pad_id=0)  # rows: completions of examples 2, 3, then their mismatched completions
    assert batch["input_ids"][0, :4].tolist() == [1, 7, 10, 2] and batch["input_ids"][2, :5].tolist() == [1, 7, 8, 9, 2]


def test_pairs_stay_pairs_and_unpaired_rows_are_refused_for_a_pair_loss():
    assert for_unit(PAIRS, "pair", "f", "sigmoid") is PAIRS
    u = TokenizedUnpaired.split_pairs(PAIRS)
    with pytest.raises(DataError, match=r"^f: field 'label': .* loss_type sigmoid trains on preference pairs"):
        for_unit(u, "pair", "f", "sigmoid")
    assert np.array_equal(for_unit(u, "unpaired", "f", "kto").labels, u.labels)


# ------------------------------------------------------------------------------- unpaired files
@pytest.fixture(scope="module")
def tok(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets.model_dir)


def _write(path, rows, fmt: str) -> str:
    if fmt == "jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def _tokenize(path: str, tok, skip_bad_rows: bool = False):
    from dpo_ds.data import PairTokenizer, tokenize_file

    return tokenize_file(path, PairTokenizer(tok, 512), skip_bad_rows)


def _completions(examples) -> list[tuple[list[int], list[int]]]:
    return [tuple(part.tolist() for part in examples.sequence(0, i)) for i in range(len(examples))]


USER = {"role": "user", "content": "Name a tool."}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dir"])
@pytest.mark.parametrize("chat", [False, True], ids=["text", "messages"])
def test_unpaired_rows_tokenize_as_the_completions_of_the_same_pairs(tmp_path, tok, fmt, chat):
    """An unpaired file (JSONL, Parquet, datasets dir; strings or chat messages) gives, row by row, the ids its
    prompt and completion get as a preference pair's prompt and chosen (rejected) completion, and its labels."""
    answers = [("Try saw.", "Try cat."), ("Try axe.", "Try red."), ("Use glue.", "Use mud.")]
    if chat:
        pairs_rows = [{"prompt": [USER], "chosen": [{"role": "assistant", "content": good}],
                       "rejected": [{"role": "assistant", "content": bad}]} for good, bad in answers]
    else:
        pairs_rows = [{"prompt": f"Q{k}: name a tool.", "chosen": f" {good}", "rejected": f" {bad}"}
                      for k, (good, bad) in enumerate(answers)]
    unpaired_rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                     for r in pairs_rows for side in ("chosen", "rejected")]
    pairs = _tokenize(_write(tmp_path / "pairs.jsonl", pairs_rows, "jsonl"), tok)
    unpaired = _tokenize(_write(tmp_path / f"unpaired.{fmt}", unpaired_rows, fmt), tok)
    assert isinstance(unpaired, TokenizedUnpaired) and unpaired.shift == 1
    assert _completions(unpaired) == _completions(TokenizedUnpaired.split_pairs(pairs))
    assert unpaired.labels.tolist() == [True, False] * 3
    assert for_unit(unpaired, "unpaired", "u", "kto") is unpaired
    assert unpaired.sequence(1, 3)[1].tolist() == unpaired.sequence(0, 2)[1].tolist()  # the row before's completion


GOOD = {"prompt": "q", "completion": " a b", "label": True}
BAD_UNPAIRED = [
    ({"prompt": "q", "completion": " a", "label": "yes"}, "label", "expected true or false, got 'yes'"),
    ({"prompt": "q", "completion": " a", "label": 1}, "label", "expected true or false, got 1"),
    ({"prompt": "q", "completion": " a"}, "label", "missing"),
    ({"prompt": "q", "label": False}, "completion", "missing"),
    ({"completion": " a", "label": False}, "prompt", "missing"),
    ({"prompt": "q", "completion": "  ", "label": False}, "completion", "empty"),
    ({"prompt": "q", "chosen": " a", "rejected": " b"}, "chosen", "a preference pair among unpaired rows"),
]


@pytest.mark.parametrize("bad,field_name,words", BAD_UNPAIRED, ids=["string_label", "int_label", "no_label",
                                                                    "no_completion", "no_prompt", "empty", "pair"])
def test_a_bad_unpaired_row_names_file_line_and_field(tmp_path, tok, bad, field_name, words):
    path = _write(tmp_path / "u.jsonl", [GOOD, bad, GOOD], "jsonl")
    with pytest.raises(DataError, match=rf"^{path}:2: field '{field_name}': {words}"):
        _tokenize(path, tok)
    assert len(_tokenize(path, tok, skip_bad_rows=True)) == 2


def test_a_bad_label_in_parquet_names_the_row(tmp_path, tok):
    path = _write(tmp_path / "u.parquet", [GOOD, {"prompt": "q", "completion": " a", "label": None}], "parquet")
    with pytest.raises(DataError, match=rf"^{path}:row 2: field 'label': missing"):
        _tokenize(path, tok)


def test_unpaired_rows_after_pairs_in_a_later_chunk_are_refused(tmp_path, tok, monkeypatch):
    from dpo_ds.data import rows as rows_module

    monkeypatch.setattr(rows_module, "CHUNK_ROWS", 2)
    pair = {"prompt": "q", "chosen": " a", "rejected": " b"}
    path = _write(tmp_path / "mixed.jsonl", [pair, pair, GOOD, GOOD], "jsonl")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'label': rows of kind unpaired after rows of kind pair"):
        _tokenize(path, tok)
