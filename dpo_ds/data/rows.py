"""Rows and their formats: where a data file's rows come from (JSONL, Parquet, `datasets` directories), how a
row is named in messages ('file:line' / 'file:row N'), and what a row must hold: a validated preference pair
(prompt, chosen, rejected) or an unpaired, labelled completion (prompt, completion, label: KTO)."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dpo_ds.errors import UsageError

CHUNK_ROWS = 256          # rows per unit of work sent to a tokenizer process


class DataError(UsageError, ValueError):
    """Bad input data, phrased with file, line and field."""


# ----------------------------------------------------------------------------------------------- rows
def source_kind(path: str) -> str:
    """'jsonl' (rows located by line), 'parquet' or 'dataset' (a `save_to_disk` directory; both by row)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data file not found")
    return "dataset" if p.is_dir() else "parquet" if p.suffix == ".parquet" else "jsonl"


def location(path: str, kind: str, number: int) -> str:
    """How a row is named in messages and per-pair records: 'file:line' for JSONL, 'file:row N' otherwise."""
    return f"{path}:{number}" if kind == "jsonl" else f"{path}:row {number}"


def row_chunks(path: str, kind: str, chunk_rows: int | None = None) -> Iterator[list[tuple[int, Any]]]:
    """The file's rows in file order, in chunks of (line or row number, raw row), never the whole file at once.

    A JSONL row is its unparsed line (the tokenizer processes parse it, in parallel); blank lines are skipped.
    Parquet is read by row groups, a `datasets` directory in batches of its memory-mapped Arrow table."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    if kind == "jsonl":
        with open(path, encoding="utf-8-sig") as fh:  # a byte order mark at the start is not part of line 1
            numbered = ((n, line) for n, line in enumerate(fh, start=1) if line.strip())
            while chunk := list(itertools.islice(numbered, chunk_rows)):
                yield chunk
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        batches = (b.to_pylist() for b in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows))
    else:
        import datasets

        table = datasets.load_from_disk(path)
        batches = ([dict(zip(b, values)) for values in zip(*b.values())] for b in table.iter(batch_size=chunk_rows))
    number = 0
    for rows in batches:
        yield [(number + i + 1, row) for i, row in enumerate(rows)]
        number += len(rows)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_messages(where: str, name: str, messages: list) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{name}': message {i} needs string 'role' and 'content'")


def _common_prefix_messages(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_prefix_text(a: str, b: str) -> int:
    """Length of the shared prefix of two strings, backed off to a whitespace boundary so no word is split."""
    n = len(os.path.commonprefix([a, b]))
    if n < min(len(a), len(b)):
        while n > 0 and not a[n - 1].isspace():
            n -= 1
        # Leave the whitespace to the completions (as TRL's extract_prompt does): a prompt ending in a space is
        # not a token prefix of prompt + completion for sentencepiece/BPE tokenizers ("about " -> '▁about','▁'
        # but "about hammer" -> '▁about','▁hammer'), and the completion would lose its first word.
        while n > 0 and a[n - 1].isspace():
            n -= 1
    return n


@dataclass(frozen=True)
class PreferenceRow:
    """One validated pair; prompt/completions are strings or lists of chat messages."""
    prompt: Any
    chosen: Any
    rejected: Any


def validate_row(where: str, row: Any) -> PreferenceRow:
    """Check one row's fields and normalise the implicit-prompt form; raise DataError naming the field."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with prompt/chosen/rejected, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise DataError(f"{where}: field '{name}': missing")
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = _is_messages(chosen)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if conversational:
            if not _is_messages(value):
                raise DataError(f"{where}: field '{name}': expected a list of messages like 'chosen'")
            _check_messages(where, name, value)
        elif not isinstance(value, str):
            raise DataError(f"{where}: field '{name}': expected a string or a list of messages, got {type(value).__name__}")
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: the common prefix of chosen and rejected
        if conversational:
            n = _common_prefix_messages(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            n = _common_prefix_text(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif conversational:
        prompt = _prompt_messages(where, prompt, "chosen/rejected are messages")
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt': expected a string, got {type(prompt).__name__}")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        text = value if isinstance(value, str) else "".join(m["content"] for m in value)
        if not text.strip():
            raise DataError(f"{where}: field '{name}': empty completion")
    if chosen == rejected:
        raise DataError(f"{where}: field 'rejected': identical to 'chosen'")
    return PreferenceRow(prompt, chosen, rejected)



def _prompt_messages(where: str, prompt: Any, why: str) -> list:
    """The prompt of a conversational row as messages: a plain string is one user message."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not _is_messages(prompt):
        raise DataError(f"{where}: field 'prompt': expected a list of messages ({why})")
    _check_messages(where, "prompt", prompt)
    return prompt


@dataclass(frozen=True)
class UnpairedRow:
    """One validated unpaired row: a completion of the prompt and whether it is desirable (`label`, KTO)."""
    prompt: Any
    completion: Any
    label: bool


def is_unpaired(row: Any) -> bool:
    """Whether a row is meant as an unpaired one (it has a completion or a label, and no chosen)."""
    return isinstance(row, dict) and "chosen" not in row and ("completion" in row or "label" in row)


def validate_unpaired_row(where: str, row: dict) -> UnpairedRow:
    """Check an unpaired row's fields (TRL's unpaired format: prompt, completion, boolean label; strings or chat
    messages); raise DataError naming the field."""
    for name in ("prompt", "completion", "label"):
        if row.get(name) is None:
            raise DataError(f"{where}: field '{name}': missing" + (" (true: a desirable completion, false: an "
                                                                  "undesirable one)" if name == "label" else ""))
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label': expected true or false, got {label!r}")
    if _is_messages(completion):
        _check_messages(where, "completion", completion)
        prompt = _prompt_messages(where, prompt, "completion is messages")
    elif not isinstance(completion, str):
        raise DataError(f"{where}: field 'completion': expected a string or a list of messages, "
                        f"got {type(completion).__name__}")
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt': expected a string, got {type(prompt).__name__}")
    text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
    if not text.strip():
        raise DataError(f"{where}: field 'completion': empty completion")
    return UnpairedRow(prompt, completion, label)
