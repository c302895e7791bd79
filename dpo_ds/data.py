"""Preference data: rows -> validated pairs -> token ids, prepared once into a memory-mapped cache -> sampler
-> micro-batches.

Tokenization follows TRL so that results are comparable: ids(prompt) and ids(prompt + completion) are
computed on whole strings and the completion is the tail after len(ids(prompt)); EOS is appended when
missing. Conversational rows go through the tokenizer's chat template (generation prompt on the prompt).

Preparation (`prepare_pairs`, run by `dpo-ds prepare` and by rank 0 of `train`/`eval` when the cache is
missing) streams the file in chunks of rows to worker processes, which validate and batch-tokenize them; the
results come back in file order and are appended to flat int32 token files with int64 offsets. Every rank
memory-maps those files read-only, so a node holds one copy in its page cache and no rank holds per-token
Python objects.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from dpo_ds.prompt_reuse import PromptReuse

logger = logging.getLogger("dpo_ds")

TOKENIZATION_VERSION = 1  # in the data fingerprint: bump when the token ids of a row change
CACHE_FORMAT = 2          # the on-disk layout of a prepared cache (part of its directory name)
CHUNK_ROWS = 256          # rows per unit of work sent to a tokenizer process
SMALL_SHARE = 0.01        # truncation touching more pairs than this share gets a full report
STAT_KEYS = ("rows", "skipped_bad_rows", "dropped_truncated", "truncated", "prompt_not_prefix",
             "identical_completions", "identical_after_truncation")


class DataError(ValueError):
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
        with open(path, encoding="utf-8") as fh:
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
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not _is_messages(prompt):
            raise DataError(f"{where}: field 'prompt': expected a list of messages (chosen/rejected are messages)")
        _check_messages(where, "prompt", prompt)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt': expected a string, got {type(prompt).__name__}")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        text = value if isinstance(value, str) else "".join(m["content"] for m in value)
        if not text.strip():
            raise DataError(f"{where}: field '{name}': empty completion")
    if chosen == rejected:
        raise DataError(f"{where}: field 'rejected': identical to 'chosen'")
    return PreferenceRow(prompt, chosen, rejected)


# ------------------------------------------------------------------------------------ token storage
class TokenColumn:
    """Ragged token sequences: sequence i is flat[offsets[i]:offsets[i+1]] (int32 ids, int64 offsets; memory-mapped
    read-only when they come from a prepared cache). Indexing gives a numpy view, never a copy."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "TokenColumn":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class PairLocations(SequenceABC):
    """The pairs' 'file:line' / 'file:row N' names, made on access from one int64 number per pair."""

    def __init__(self, path: str, kind: str, numbers: np.ndarray):
        self.path, self.kind, self.numbers = path, kind, numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return location(self.path, self.kind, int(self.numbers[i]))


def _empty_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


@dataclass
class TokenizedPairs:
    """Token ids of all pairs of one file, in file order; `pair_ids` name the rows they came from.

    prompt/chosen/rejected are TokenColumns (lists of id lists are converted, for tests and synthetic data)."""
    fingerprint: str = ""  # of the file, tokenizer and tokenization settings (set by load_pairs)
    prompt: Any = field(default_factory=list)
    chosen: Any = field(default_factory=list)
    rejected: Any = field(default_factory=list)
    pair_ids: Sequence[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=_empty_stats)
    report: dict = field(default_factory=dict)  # length percentiles (length_report), when prepared from a file
    cache_path: str | None = None

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected"):
            if not isinstance(getattr(self, name), TokenColumn):
                setattr(self, name, TokenColumn.from_lists(getattr(self, name)))

    def __len__(self) -> int:
        return len(self.prompt)

    def lengths(self) -> np.ndarray:
        """Tokens of the longer sequence of each pair (what padding is driven by), int64."""
        return self.prompt.lengths + np.maximum(self.chosen.lengths, self.rejected.lengths)

    def length(self, i: int) -> int:
        return len(self.prompt[i]) + max(len(self.chosen[i]), len(self.rejected[i]))

    def real_tokens(self, i: int) -> int:
        return 2 * len(self.prompt[i]) + len(self.chosen[i]) + len(self.rejected[i])

    @property
    def stored_tokens(self) -> int:
        return len(self.prompt.flat) + len(self.chosen.flat) + len(self.rejected.flat)


# ------------------------------------------------------------------------------------- tokenization
class PairTokenizer:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None):
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no EOS token; set `eos_token` in its tokenizer_config.json")
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.encoding_path = ""  # which encoding prompt_reuse chose, and why (set with it)

    @functools.cached_property
    def prompt_reuse(self) -> PromptReuse | None:
        """Encodes each prompt once where that is exact for this tokenizer; None: prompts are encoded whole.
        Decided on first use, so that loading a prepared cache does not pay for it."""
        reuse, self.encoding_path = PromptReuse.for_tokenizer(self.tok)
        return reuse

    def _texts(self, row: PreferenceRow) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, special tokens already in the text?)."""
        if isinstance(row.chosen, str):
            return row.prompt, row.chosen, row.rejected, False
        if not getattr(self.tok, "chat_template", None):
            raise DataError("conversational rows need a tokenizer with a chat_template")
        prompt = self.tok.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)

        def completion(messages: list) -> str:
            full = self.tok.apply_chat_template(row.prompt + messages, tokenize=False)
            # the completion is what the template adds after the generation prompt
            return full[len(prompt):] if full.startswith(prompt) else full[len(os.path.commonprefix([full, prompt])):]

        return prompt, completion(row.chosen), completion(row.rejected), True

    def _encode_triples(self, texts: list[tuple[str, str, str]], add_special_tokens: bool) -> tuple[list, int]:
        """([ids(p), ids(p + c), ids(p + r)] of each (p, c, r), prompts encoded once)."""
        if self.prompt_reuse is not None:
            return self.prompt_reuse.encode(texts, add_special_tokens)
        batch = [s for p, c, r in texts for s in (p, p + c, p + r)]
        ids = self.tok(batch, add_special_tokens=add_special_tokens)["input_ids"]
        return [ids[k:k + 3] for k in range(0, len(ids), 3)], 0

    def encode(self, rows: Sequence[PreferenceRow]) -> tuple[list[tuple[list[int], list[int], list[int], bool]], int]:
        """(untruncated (prompt ids, chosen ids, rejected ids, prompt-was-a-prefix) of each row, how many prompts
        were encoded once), with one batched tokenizer call per kind of row (plain text / chat-templated)."""
        texts = [self._texts(row) for row in rows]
        out: list = [None] * len(rows)
        eos = self.tok.eos_token_id
        reused = 0
        for templated in (False, True):
            mine = [i for i, t in enumerate(texts) if t[3] == templated]
            if not mine:
                continue
            triples, n = self._encode_triples([texts[i][:3] for i in mine], add_special_tokens=not templated)
            reused += n
            for i, (prompt_ids, *fulls) in zip(mine, triples):
                is_prefix = True
                completions = []
                for full in fulls:
                    is_prefix &= full[: len(prompt_ids)] == prompt_ids
                    tail = full[len(prompt_ids):]
                    if not tail or tail[-1] != eos:
                        tail = tail + [eos]
                    completions.append(tail)
                out[i] = (prompt_ids, completions[0], completions[1], is_prefix)
        return out, reused

    def truncate(self, prompt_ids: list[int], chosen: list[int], rejected: list[int]
                 ) -> tuple[list[int], list[int], list[int]] | None:
        """Keep the last max_prompt_length prompt tokens and cut completions to max_length; None when the prompt
        leaves no completion token."""
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        room = self.max_length - len(prompt_ids)
        if room < 1:
            return None
        return prompt_ids, chosen[:room], rejected[:room]


@dataclass
class ChunkResult:
    """What tokenizing one chunk of rows gives, in file order: kept pairs as flat arrays, untruncated lengths
    of every tokenized pair (for the length report), counters, and the chunk's first bad row (when not skipped)."""
    numbers: np.ndarray
    columns: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (flat int32 ids, int64 lengths)
    raw_lengths: np.ndarray  # [pairs tokenized, 3] int32: prompt, chosen, rejected before truncation
    stats: dict[str, int]
    error: str | None = None
    prompts_encoded_once: int = 0  # of the chunk's tokenized rows (dpo_ds.prompt_reuse)


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum())), lengths


class ChunkTokenizer:
    """Rows of one chunk -> ChunkResult: parse (JSONL), validate, batch-tokenize, truncate, count. Runs in the
    tokenizer processes; a bad row ends the chunk there unless skip_bad_rows."""

    def __init__(self, path: str, kind: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool):
        self.path, self.kind, self.pair_tokenizer, self.skip_bad_rows = path, kind, pair_tokenizer, skip_bad_rows

    def _row(self, number: int, raw: Any) -> PreferenceRow:
        where = location(self.path, self.kind, number)
        if self.kind == "jsonl":
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
        return validate_row(where, raw)

    def __call__(self, chunk: list[tuple[int, Any]]) -> ChunkResult:
        stats = _empty_stats()
        rows, numbers, error = [], [], None
        for number, raw in chunk:
            stats["rows"] += 1
            try:
                rows.append(self._row(number, raw))
                numbers.append(number)
            except DataError as err:
                if not self.skip_bad_rows:
                    error = str(err)
                    break
                stats["skipped_bad_rows"] += 1
        reused = 0
        try:
            encoded, reused = self.pair_tokenizer.encode(rows)
        except DataError as err:  # e.g. chat rows without a chat template: not a property of one row
            encoded, error = [], error or f"{self.path}: {err}"
        kept = {"prompt": [], "chosen": [], "rejected": []}
        kept_numbers = []
        raw_lengths = np.zeros((len(encoded), 3), dtype=np.int32)
        for j, (number, (prompt_ids, chosen, rejected, is_prefix)) in enumerate(zip(numbers, encoded)):
            raw_lengths[j] = (len(prompt_ids), len(chosen), len(rejected))
            stats["prompt_not_prefix"] += not is_prefix
            cut = self.pair_tokenizer.truncate(prompt_ids, chosen, rejected)
            if cut is None:
                stats["dropped_truncated"] += 1
                continue
            if cut[1] == cut[2]:  # no preference signal: both completions are the same ids
                stats["identical_completions"] += 1
                stats["identical_after_truncation"] += chosen != rejected
                continue
            stats["truncated"] += (len(cut[0]), len(cut[1]), len(cut[2])) != tuple(raw_lengths[j])
            for name, ids in zip(("prompt", "chosen", "rejected"), cut):
                kept[name].append(ids)
            kept_numbers.append(number)
        return ChunkResult(np.asarray(kept_numbers, dtype=np.int64), {k: _flat(v) for k, v in kept.items()},
                           raw_lengths, stats, error, reused)


_worker: ChunkTokenizer | None = None  # this tokenizer process's ChunkTokenizer (set once, by fork inheritance)


def _init_worker(chunk_tokenizer: ChunkTokenizer) -> None:
    global _worker
    # Stop signals are the parent's business (the trainer's handlers would make a forked worker ignore the
    # pool's terminate); the parent ends the pool when it stops.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    torch.set_num_threads(1)
    _worker = chunk_tokenizer


def _run_worker(chunk: list[tuple[int, Any]]) -> ChunkResult:
    return _worker(chunk)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tokenized_chunks(path: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool, workers: int = 0
                     ) -> Iterator[ChunkResult]:
    """ChunkResults of the whole file in file order, from `workers` processes (0: one per available core).

    At most 4 chunks per process are in flight, so a fast reader never queues the file in memory. The first bad
    row in file order is raised (as DataError) even when a later chunk finished first."""
    kind = source_kind(path)
    chunk_tokenizer = ChunkTokenizer(path, kind, pair_tokenizer, skip_bad_rows)
    chunks = row_chunks(path, kind)
    workers = workers or default_workers()

    def checked(result: ChunkResult) -> ChunkResult:
        if result.error:
            raise DataError(result.error)
        return result

    if workers == 1:
        for chunk in chunks:
            yield checked(chunk_tokenizer(chunk))
        return
    # fork: the processes inherit the loaded tokenizer instead of unpickling it (and re-importing torch)
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (chunk_tokenizer,)) as pool:
        pending = collections.deque()
        for chunk in itertools.chain(chunks, [None]):
            if chunk is not None:
                pending.append(pool.apply_async(_run_worker, (chunk,)))
            while pending and (chunk is None or len(pending) >= 4 * workers):
                yield checked(pending.popleft().get())


def length_report(raw_lengths: np.ndarray, max_length: int, max_prompt_length: int | None) -> dict:
    """Percentiles of the untruncated lengths, and the max_length / max_prompt_length keeping 99% of pairs whole."""
    prompt, chosen, rejected = (raw_lengths[:, k].astype(np.int64) for k in range(3))
    pair = prompt + np.maximum(chosen, rejected)

    def pct(values: np.ndarray) -> dict[str, int]:
        if not len(values):
            return {k: 0 for k in ("p50", "p90", "p99", "max")}
        q = np.quantile(values, [0.5, 0.9, 0.99], method="higher")
        return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(values.max())}

    lengths = {"prompt": pct(prompt), "chosen": pct(chosen), "rejected": pct(rejected), "pair": pct(pair)}
    return {"pairs": len(pair), "lengths": lengths, "max_length": max_length, "max_prompt_length": max_prompt_length,
            "keep_99": {"max_length": lengths["pair"]["p99"], "max_prompt_length": lengths["prompt"]["p99"]}}


def format_report(pairs: "TokenizedPairs", path: str) -> str:
    """The human summary `dpo-ds prepare` prints: pairs kept / dropped / cut, tokens, length percentiles."""
    s, r = pairs.stats, pairs.report
    lines = [f"{path}: {s['rows']} rows -> {len(pairs)} pairs kept; {s['skipped_bad_rows']} bad rows skipped, "
             f"{s['dropped_truncated']} pairs dropped (prompt fills max_length), {s['truncated']} cut to fit, "
             f"{s['identical_completions']} skipped for identical chosen/rejected ids",
             f"  tokens stored: {len(pairs.prompt.flat)} prompt + {len(pairs.chosen.flat)} chosen + "
             f"{len(pairs.rejected.flat)} rejected = {pairs.stored_tokens}"]
    if r:
        lines.append(_percentile_table(r))
    return "\n".join(lines)


def _percentile_table(report: dict) -> str:
    rows = [f"  {'tokens before truncation':<34}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    names = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "pair": "prompt + longer completion"}
    for key, name in names.items():
        v = report["lengths"][key]
        rows.append(f"  {name:<34}{v['p50']:>8}{v['p90']:>8}{v['p99']:>8}{v['max']:>8}")
    keep = report["keep_99"]
    rows.append(f"  max_length {keep['max_length']} with max_prompt_length {keep['max_prompt_length']} would keep 99% "
                f"of the pairs whole (now max_length {report['max_length']}, max_prompt_length "
                f"{report['max_prompt_length']})")
    return "\n".join(rows)


def warn_about(pairs: "TokenizedPairs", path: str) -> None:
    """The warnings of a prepared file: skipped rows, truncation (with percentiles when it is not rare),
    identical completions, prompts that are not token prefixes."""
    s = pairs.stats
    if s["prompt_not_prefix"]:
        logger.warning("%s: in %d pairs the prompt's token ids are not a prefix of prompt+completion's "
                       "(the tokenizer merges across the boundary); the completion is the tail after "
                       "len(ids(prompt)), as in TRL", path, s["prompt_not_prefix"])
    if s["skipped_bad_rows"]:
        logger.warning("%s: skipped %d bad rows (skip_bad_rows)", path, s["skipped_bad_rows"])
    if s["identical_completions"]:
        logger.warning("%s: skipped %d pairs whose chosen and rejected completions are the same token ids (no "
                       "preference signal)%s", path, s["identical_completions"],
                       f"; {s['identical_after_truncation']} of them differ only beyond max_length"
                       if s["identical_after_truncation"] else "")
    tokenized = pairs.report.get("pairs", 0)
    touched = s["dropped_truncated"] + s["truncated"]
    if tokenized and touched > SMALL_SHARE * tokenized:
        logger.warning("%s: truncation dropped %d and cut %d of %d pairs (%.0f%%)\n%s", path, s["dropped_truncated"],
                       s["truncated"], tokenized, 100 * touched / tokenized, _percentile_table(pairs.report))
    elif s["dropped_truncated"]:
        logger.warning("%s: dropped %d pairs whose prompt leaves no completion token within max_length",
                       path, s["dropped_truncated"])


# --------------------------------------------------------------------------------------- the cache
def file_digest(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        h.update(str(q.relative_to(p) if p.is_dir() else q.name).encode())
        with q.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens,
                         getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                         tokenizer.eos_token_id]).encode())
    # The vocab and special tokens miss how text becomes ids (e.g. add_bos_token=False in the post-processor,
    # another normalizer): hash the whole pipeline when there is one.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()


def data_fingerprint(path: str, tokenizer, max_length: int, max_prompt_length: int | None, skip_bad_rows: bool) -> str:
    parts = [TOKENIZATION_VERSION, file_digest(path), tokenizer_digest(tokenizer), max_length, max_prompt_length,
             skip_bad_rows]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def cache_path(cache_dir: str, fingerprint: str) -> Path:
    return Path(cache_dir) / f"pairs-{fingerprint}.v{CACHE_FORMAT}"


COLUMNS = ("prompt", "chosen", "rejected")
# file name -> numpy dtype; a column's ids in <name>.ids, its n+1 offsets in <name>.offsets
CACHE_FILES = {**{f"{c}.ids": "<i4" for c in COLUMNS}, **{f"{c}.offsets": "<i8" for c in COLUMNS}, "rows.i64": "<i8"}
META = "meta.json"  # written last: its presence with matching file sizes is the completeness marker


class CacheWriter:
    """Appends ChunkResults to the flat files of a cache directory being built."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True)
        self.directory = directory
        self.files = {name: (directory / name).open("wb") for name in CACHE_FILES}
        self.ends = dict.fromkeys(COLUMNS, 0)  # tokens written per column
        for c in COLUMNS:
            self.files[f"{c}.offsets"].write(np.zeros(1, "<i8").tobytes())
        self.pairs = 0

    def add(self, result: ChunkResult) -> None:
        for c in COLUMNS:
            flat, lengths = result.columns[c]
            self.files[f"{c}.ids"].write(flat.astype("<i4", copy=False).tobytes())
            self.files[f"{c}.offsets"].write((self.ends[c] + np.cumsum(lengths)).astype("<i8").tobytes())
            self.ends[c] += int(lengths.sum())
        self.files["rows.i64"].write(result.numbers.astype("<i8", copy=False).tobytes())
        self.pairs += len(result.numbers)

    def close(self, meta: dict | None) -> None:
        """Make the files durable and write the completeness marker (meta None: abandon, close only)."""
        for fh in self.files.values():
            if meta is not None:
                fh.flush()
                os.fsync(fh.fileno())
            fh.close()
        if meta is None:
            return
        meta = {**meta, "format": CACHE_FORMAT, "pairs": self.pairs, "tokens": self.ends,
                "file_bytes": {name: (self.directory / name).stat().st_size for name in CACHE_FILES}}
        (self.directory / META).write_text(json.dumps(meta, indent=1))


def _map(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def cache_problem(cache: Path, fingerprint: str) -> str | None:
    """Why `cache` cannot be used as the prepared pairs of `fingerprint` (None: it is complete and matches)."""
    try:
        meta = json.loads((cache / META).read_text())
    except FileNotFoundError:
        return f"no {META} (an interrupted preparation)"
    except (OSError, ValueError) as err:
        return f"unreadable {META} ({err})"
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
        return f"written for format {meta.get('format')}, fingerprint {meta.get('fingerprint')}"
    n, tokens = meta["pairs"], meta["tokens"]
    expected = {**{f"{c}.ids": 4 * tokens[c] for c in COLUMNS}, **{f"{c}.offsets": 8 * (n + 1) for c in COLUMNS},
                "rows.i64": 8 * n}
    for name, size in expected.items():
        path = cache / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size or meta["file_bytes"].get(name) != size:
            return f"{name} has {actual} bytes, {size} expected (truncated or modified)"
    for c in COLUMNS:
        offsets = _map(cache / f"{c}.offsets", "<i8")
        if offsets[0] != 0 or offsets[-1] != tokens[c] or (n and (np.diff(offsets) < 0).any()):
            return f"{c}.offsets do not describe {c}.ids"
    return None


def open_cache(cache: Path) -> TokenizedPairs:
    """A complete cache (check with cache_problem first), memory-mapped read-only."""
    meta = json.loads((cache / META).read_text())
    columns = {c: TokenColumn(_map(cache / f"{c}.ids", "<i4"), _map(cache / f"{c}.offsets", "<i8")) for c in COLUMNS}
    return TokenizedPairs(fingerprint=meta["fingerprint"], pair_ids=PairLocations(meta["source"], meta["kind"],
                          _map(cache / "rows.i64", "<i8")), stats=meta["stats"], report=meta["report"],
                          cache_path=str(cache), **columns)


def prepare_pairs(path: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool, cache: Path, fingerprint: str,
                  workers: int = 0) -> TokenizedPairs:
    """Tokenize `path` into the cache directory `cache` (built aside, then renamed into place) and open it.

    Reuses a complete cache; one that is incomplete or does not match is named and rebuilt."""
    problem = cache_problem(cache, fingerprint) if cache.exists() else "missing"
    if problem is None:
        pairs = open_cache(cache)
        logger.info("%s: %d prepared pairs (%d tokens) in %s", path, len(pairs), pairs.stored_tokens, cache)
        warn_about(pairs, path)
        return pairs
    if problem != "missing":
        logger.warning("%s: unusable cache (%s); preparing it again", cache, problem)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    reuse = pair_tokenizer.prompt_reuse
    logger.info("%s: %s", path, f"each prompt encoded once ({reuse.description})" if reuse else
                f"prompts encoded whole with each completion ({pair_tokenizer.encoding_path})")
    writer = CacheWriter(tmp)
    try:
        stats, raw, encoded_once = _empty_stats(), [], 0
        with _progress(path) as bar:
            for result in tokenized_chunks(path, pair_tokenizer, skip_bad_rows, workers):
                writer.add(result)
                raw.append(result.raw_lengths)
                for k, v in result.stats.items():
                    stats[k] += v
                encoded_once += result.prompts_encoded_once
                bar.update(len(result.numbers))
        report = length_report(np.concatenate(raw) if raw else np.zeros((0, 3), np.int32), pair_tokenizer.max_length,
                               pair_tokenizer.max_prompt_length)
        if not writer.pairs:  # say why (truncation, identical completions, bad rows) before failing
            writer.close(None)
            warn_about(TokenizedPairs(stats=stats, report=report), path)
            raise DataError(f"{path}: no usable preference pairs")
        writer.close({"fingerprint": fingerprint, "source": path, "kind": source_kind(path), "stats": stats,
                      "report": report, "seconds": time.perf_counter() - started})
        if cache.exists():  # the unusable one named above
            shutil.rmtree(cache)
        try:
            os.replace(tmp, cache)
        except OSError:  # another job published it meanwhile: use theirs if it is complete
            if cache_problem(cache, fingerprint) is not None:
                raise
    except BaseException:
        writer.close(None)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    pairs = open_cache(cache)
    logger.info("prepared %d pairs (%d tokens) in %.1f s (%.0f pairs/s) -> %s", len(pairs), pairs.stored_tokens,
                seconds, len(pairs) / max(seconds, 1e-9), cache)
    if reuse is not None:  # prompts without a safe cut near their end were encoded whole
        logger.info("%s: %d of %d prompts encoded once", path, encoded_once, stats["rows"] - stats["skipped_bad_rows"])
    warn_about(pairs, path)
    return pairs


def _progress(path: str):
    from tqdm import tqdm

    return tqdm(desc=f"preparing {Path(path).name}", unit=" pairs", dynamic_ncols=True, mininterval=2.0,
                disable=not logger.isEnabledFor(logging.INFO))


def tokenize_file(path: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool, workers: int = 1) -> TokenizedPairs:
    """All pairs of `path` without a lasting cache: prepared into a temporary directory that is gone when this
    returns (the arrays stay mapped)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dpo-ds-pairs-") as tmp:
        return prepare_pairs(path, pair_tokenizer, skip_bad_rows, Path(tmp) / "pairs", "", workers)


def load_pairs(path: str, tokenizer, *, max_length: int, max_prompt_length: int | None, skip_bad_rows: bool,
               cache_dir: str | None, rank: int = 0, barrier: Callable[[], None] = lambda: None, workers: int = 0,
               poll_s: float = 0.5) -> tuple[TokenizedPairs, str]:
    """The prepared pairs of `path`, shared by all ranks through `cache_dir`. Returns (pairs, fingerprint).

    Rank 0 prepares the cache when it is missing (in parallel processes); the other ranks wait on the file
    system, not in a collective, so a preparation longer than the process group's timeout is fine. `barrier` is
    met once before, so that no rank reads an error file left by an earlier run. A failure on rank 0 is written
    next to the cache and raised on every rank."""
    fingerprint = data_fingerprint(path, tokenizer, max_length, max_prompt_length, skip_bad_rows)
    pair_tokenizer = PairTokenizer(tokenizer, max_length, max_prompt_length)
    if cache_dir is None:
        pairs = tokenize_file(path, pair_tokenizer, skip_bad_rows, workers)
        pairs.fingerprint = fingerprint
        return pairs, fingerprint
    cache = cache_path(cache_dir, fingerprint)
    error_file = cache.with_name(cache.name + ".error")
    if rank == 0:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        error_file.unlink(missing_ok=True)
    barrier()
    if rank == 0:
        try:
            return prepare_pairs(path, pair_tokenizer, skip_bad_rows, cache, fingerprint, workers), fingerprint
        except BaseException as err:  # tell the waiting ranks instead of leaving them waiting
            error_file.write_text(str(err) if isinstance(err, DataError) else f"{path}: preparing failed: {err!r}")
            raise
    return wait_for_cache(cache, fingerprint, error_file, rank, poll_s), fingerprint


def wait_for_cache(cache: Path, fingerprint: str, error_file: Path, rank: int, poll_s: float) -> TokenizedPairs:
    """Wait (on the file system) until rank 0 has published `cache` or failed, saying so every few minutes."""
    started = time.monotonic()
    next_message = started + 2.0  # quiet when the cache is (nearly) ready
    # one message per node is enough: rank 1 and each other node's first rank
    speaks = rank == 1 or os.environ.get("LOCAL_RANK") == "0"
    while True:
        if error_file.exists():
            raise DataError(error_file.read_text())
        if cache.exists() and cache_problem(cache, fingerprint) is None:
            return open_cache(cache)
        now = time.monotonic()
        if speaks and now >= next_message:
            logger.warning("rank %d: waiting for rank 0 to prepare %s (%.0f s so far; cache_dir must be on a file "
                           "system all nodes share)", rank, cache, now - started)
            next_message = now + 300
        time.sleep(poll_s)
# ------------------------------------------------------------------------------------------ sampler
@dataclass
class PairSampler:
    """Which pairs each rank uses at each optimizer step; the one place that knows where a run is.

    Each epoch is cut into micro-batches; optimizer step k of the epoch uses micro-batches
    [k*M, (k+1)*M), M = grad_accum * world_size, micro-step m on rank r taking number k*M + m*world_size + r.
    With fixed-size micro-batches of B pairs cut from the epoch order, step k therefore uses positions
    [k*G, (k+1)*G) of that order (G = B * M), and micro-step m on rank r the B positions from (m*world_size + r)*B.
    Micro-batches after the last full step of an epoch are not used.

    With `max_tokens` (a token budget), pairs of similar length are packed into each micro-batch until
    2 x pairs x longest sequence would exceed the budget, so micro-batches carry similar token counts and
    pair counts vary; `loss_scale` then keeps every pair's weight in the step equal.

    An epoch's micro-batches are two int64 arrays (pair indices in use order, and where each micro-batch
    starts), so even 10M pairs cost a few bytes each.
    """
    lengths: Sequence[int]
    micro_batch_size: int
    grad_accum: int
    world_size: int
    shuffle: bool
    group_by_length: bool
    seed: int
    max_tokens: int | None = None

    def __post_init__(self):
        self.lengths = np.asarray(self.lengths, dtype=np.int64)

    @classmethod
    def for_config(cls, cfg, pairs: "TokenizedPairs", world_size: int) -> "PairSampler":
        return cls(pairs.lengths(), cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                   world_size, cfg.shuffle, cfg.group_by_length, cfg.seed, cfg.max_tokens_per_micro_batch)

    @property
    def micro_batches_per_step(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def pairs_per_step(self) -> int:
        """Pairs of one step with fixed-size micro-batches (the nominal count under a token budget)."""
        return self.micro_batch_size * self.micro_batches_per_step

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.max_tokens:  # fixed-size micro-batches: n // B full ones, whatever the order
            return len(self.lengths) // self.pairs_per_step
        # Under a token budget the count depends on the epoch's order: build it once per epoch, not per step.
        counts = self.__dict__.setdefault("_steps_by_epoch", {})
        if epoch not in counts:
            counts[epoch] = (len(self._build_micro_batches(epoch)[1]) - 1) // self.micro_batches_per_step
        return counts[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in_epoch(0)

    def total_steps(self, num_epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(num_epochs))

    def _locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of global step `step`."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # distinct for every (seed, epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """All pairs of the epoch in the order their micro-batches are used (unused ones last, in shuffled order)."""
        used, _ = self._micro_batches(epoch)
        shuffled = self._shuffled(epoch)
        is_used = np.zeros(len(self.lengths), dtype=bool)
        is_used[used] = True
        return np.concatenate([used, shuffled[~is_used[shuffled]]]).tolist()

    def _shuffled(self, epoch: int) -> np.ndarray:
        n = len(self.lengths)
        return torch.randperm(n, generator=self._generator(epoch)).numpy() if self.shuffle else np.arange(n)

    def _micro_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_batches = epoch, self._build_micro_batches(epoch)
        return self._cached_batches

    def _build_micro_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(pair indices in use order, n_micro_batches + 1 bounds): micro-batch j is indices[bounds[j]:bounds[j+1]]."""
        order = self._shuffled(epoch)
        b = self.micro_batch_size
        if not (self.group_by_length or self.max_tokens):
            full = len(order) // b * b
            return order[:full], np.arange(0, full + 1, b, dtype=np.int64)
        # Sort within windows of 64 micro-batches, cut into micro-batches of similar length, then shuffle the
        # micro-batches (seeded, also when shuffle is off) so steps do not run from long to short.
        parts, sizes = [], []
        window = 64 * b
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first, ties in order
            if self.max_tokens:
                counts = self._pack(self.lengths[chunk])
            else:
                counts = [b] * (len(chunk) // b)
            parts.append(chunk[:sum(counts)])
            sizes += counts
        indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        g = self._generator(epoch)
        g.manual_seed(g.initial_seed() + 1)  # the block shuffle must not repeat the pair permutation
        perm = torch.randperm(len(sizes), generator=g).numpy()
        new_bounds = np.concatenate([[0], np.cumsum(sizes[perm])]).astype(np.int64)
        gather = np.repeat(bounds[perm] - new_bounds[:-1], sizes[perm]) + np.arange(new_bounds[-1])
        return indices[gather], new_bounds

    def _pack(self, lengths_desc: np.ndarray) -> list[int]:
        """Greedy token-budget packing of pairs sorted longest first: sizes of micro-batches holding n pairs
        while 2 * n * (their longest pair) <= max_tokens, and always at least one pair."""
        sizes, current, longest = [], 0, 0
        for length in lengths_desc.tolist():
            if current and 2 * (current + 1) * longest > self.max_tokens:
                sizes.append(current)
                current = 0
            if not current:
                longest = length
            current += 1
        return sizes + ([current] if current else [])

    def _batch(self, epoch: int, j: int) -> list[int]:
        indices, bounds = self._micro_batches(epoch)
        return indices[bounds[j]:bounds[j + 1]].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The grad_accum micro-batches (lists of pair indices) of global optimizer step `step` on `rank`."""
        epoch, k = self._locate(step)
        base = k * self.micro_batches_per_step
        return [self._batch(epoch, base + m * self.world_size + rank) for m in range(self.grad_accum)]

    def pairs_in_step(self, step: int) -> int:
        epoch, k = self._locate(step)
        bounds = self._micro_batches(epoch)[1]
        base = k * self.micro_batches_per_step
        return int(bounds[base + self.micro_batches_per_step] - bounds[base])

    def loss_scale(self, step: int) -> float:
        """Factor on a micro-batch's summed pair losses so the step's gradient is the mean over all of its pairs:
        DeepSpeed averages micro-batch losses over accumulation and ranks, which equals the pair mean only when
        every micro-batch holds the same number of pairs."""
        return self.micro_batches_per_step / self.pairs_in_step(step)

    def state(self, step: int) -> dict[str, int]:
        epoch, k = self._locate(step)
        consumed = (step * self.pairs_per_step if not self.max_tokens
                    else sum(self.pairs_in_step(s) for s in range(step)))
        return {"epoch": epoch, "step_in_epoch": k, "consumed_pairs": consumed}


def rank_shares(num_pairs: int, micro_batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """One pass over all pairs split over ranks, for scoring (eval, reference precompute): this rank's pair
    indices per forward. Every rank gets the same number of forwards, as ZeRO-3's collective parameter
    gathers require; a rank with no pairs left gets [] (run pair 0 and discard it)."""
    b = micro_batch_size
    for start in range(0, num_pairs, b * world_size):
        yield list(range(start + rank * b, min(start + (rank + 1) * b, num_pairs)))


# ---------------------------------------------------------------------------------------- collation
def collate(pairs: TokenizedPairs, indices: Sequence[int], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """The 2B sequences of B pairs: prompt+chosen of each pair, then prompt+rejected of each pair.

    Right-padded (default): one sequence per row, rows [0, B) chosen and [B, 2B) rejected, with an attention
    mask. Packed (`padding_free`): all 2B sequences in one row with no padding, position ids restarting at
    each sequence and `sequence_ids` naming each position's sequence; transformers then masks attention to
    each sequence (flash-attention varlen where available, a block-diagonal causal mask otherwise).
    `loss_mask` is 1 exactly on completion tokens (never on prompt or padding).
    """
    seqs = [(pairs.prompt[i], completions[i]) for completions in (pairs.chosen, pairs.rejected) for i in indices]
    prompt_lens = np.array([len(p) for p, _ in seqs], dtype=np.int64)
    totals = prompt_lens + np.array([len(c) for _, c in seqs], dtype=np.int64)
    if packed:
        starts = np.concatenate([[0], np.cumsum(totals)[:-1]])
        positions = np.arange(int(totals.sum())) - np.repeat(starts, totals)
        loss_mask = (positions >= np.repeat(prompt_lens, totals)) & (positions > 0)  # a first token is never scored
        return {"input_ids": torch.from_numpy(np.concatenate([x for s in seqs for x in s]).astype(np.int64)[None]),
                "position_ids": torch.from_numpy(positions[None]),
                "loss_mask": torch.from_numpy(loss_mask[None]),
                "sequence_ids": torch.from_numpy(np.repeat(np.arange(len(seqs), dtype=np.int64), totals)[None])}
    width = int(totals.max())
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    columns = np.arange(width)
    for row, (prompt, completion) in enumerate(seqs):
        input_ids[row, :len(prompt)] = prompt
        input_ids[row, len(prompt):totals[row]] = completion
    attention_mask = (columns < totals[:, None]).astype(np.int64)
    loss_mask = (columns >= prompt_lens[:, None]) & (columns < totals[:, None])
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "loss_mask": torch.from_numpy(loss_mask)}
