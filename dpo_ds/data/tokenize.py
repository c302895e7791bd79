"""Tokenization: validated pairs -> token ids as TRL computes them, in chunks of rows, in worker processes.

ids(prompt) and ids(prompt + completion) are computed on whole strings and the completion is the tail after
len(ids(prompt)); EOS is appended when missing. Conversational rows go through the tokenizer's chat template
(generation prompt on the prompt). Where it is exact (dpo_ds.data.prompt_reuse), each prompt is encoded once.
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dpo_ds.data.examples import TokenColumn, empty_stats
from dpo_ds.data.prompt_reuse import PromptReuse
from dpo_ds.data.rows import (DataError, PreferenceRow, UnpairedRow, is_unpaired, location, row_chunks, source_kind,
                              validate_row, validate_unpaired_row)

TOKENIZATION_VERSION = 2  # in the data fingerprint: bump when the token ids of a row change
SENTINEL = "\x00dpo-ds completion\x00"  # stands for an assistant message when reading a chat template


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

    @functools.cached_property
    def end_of_turn(self) -> tuple[str, int | None]:
        """(the text the chat template closes an assistant message with, without the whitespace it may add after
        it; that text's token id when it is one token, e.g. ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's
        <end_of_turn>). ("", None) when the template closes it with nothing (or cannot render a sample turn)."""
        try:
            rendered = self.tok.apply_chat_template([{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": SENTINEL}], tokenize=False)
        except Exception:  # a template with rules of its own (roles, system turns): no ending read from it
            return "", None
        suffix = rendered[rendered.rfind(SENTINEL) + len(SENTINEL):].rstrip() if SENTINEL in rendered else ""
        ids = self.tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        return suffix, ids[0] if len(ids) == 1 else None

    def _texts(self, row: PreferenceRow) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, special tokens already in the text?)."""
        if isinstance(row.chosen, str):
            return row.prompt, row.chosen, row.rejected, False
        if not getattr(self.tok, "chat_template", None):
            raise DataError("conversational rows need a tokenizer with a chat_template")
        prompt = self.tok.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)

        end, _ = self.end_of_turn

        def completion(messages: list) -> str:
            full = self.tok.apply_chat_template(row.prompt + messages, tokenize=False)
            # the completion is what the template adds after the generation prompt, up to its end-of-turn text:
            # whitespace the template puts after that (ChatML's newline) is not part of the answer
            text = full[len(prompt):] if full.startswith(prompt) else full[len(os.path.commonprefix([full, prompt])):]
            return text.rstrip() if end and text.rstrip().endswith(end) else text

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
        # A completion ends with exactly one end-of-turn token: the template's own (templated rows) or EOS, which
        # is appended when the completion does not already end with one of them.
        ends = {False: {eos}, True: {eos, self.end_of_turn[1]} - {None}}
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
                    if not tail or tail[-1] not in ends[templated]:
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
    prompts_encoded_once: int = 0  # of the chunk's tokenized rows (dpo_ds.data.prompt_reuse)
    kind: str | None = "pair"  # the kind of example (data.examples.EXAMPLE_KINDS) its rows are; None: no valid row
    first_row: int = 0  # line or row number of the chunk's first row


class ChunkTokenizer:
    """Rows of one chunk -> ChunkResult: parse (JSONL), validate, batch-tokenize, truncate, count. Runs in the
    tokenizer processes; a bad row ends the chunk there unless skip_bad_rows.

    The chunk's rows are preference pairs (columns prompt, chosen, rejected) or unpaired rows (prompt,
    completion, label: the label stored as a one-id column, 1 = desirable), as its first row is; an unpaired
    row's completion goes through the pair encoder's two completion slots (encoded twice, with the same ids)."""

    def __init__(self, path: str, kind: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool):
        self.path, self.kind, self.pair_tokenizer, self.skip_bad_rows = path, kind, pair_tokenizer, skip_bad_rows

    def _row(self, number: int, raw: Any, first: PreferenceRow | UnpairedRow | None) -> PreferenceRow | UnpairedRow:
        where = location(self.path, self.kind, number)
        if self.kind == "jsonl":
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
        row = validate_unpaired_row(where, raw) if is_unpaired(raw) else validate_row(where, raw)
        if first is not None and type(row) is not type(first):
            raise DataError(f"{where}: field 'label': an unpaired row (prompt, completion, label) among preference "
                            f"pairs (prompt, chosen, rejected)" if isinstance(row, UnpairedRow) else
                            f"{where}: field 'chosen': a preference pair among unpaired rows (prompt, completion, "
                            f"label)")
        return row

    def __call__(self, chunk: list[tuple[int, Any]]) -> ChunkResult:
        stats = empty_stats()
        rows, numbers, error = [], [], None
        for number, raw in chunk:
            stats["rows"] += 1
            try:
                rows.append(self._row(number, raw, rows[0] if rows else None))
                numbers.append(number)
            except DataError as err:
                if not self.skip_bad_rows:
                    error = str(err)
                    break
                stats["skipped_bad_rows"] += 1
        reused = 0
        unpaired = bool(rows) and isinstance(rows[0], UnpairedRow)
        try:
            encoded, reused = self.pair_tokenizer.encode(
                [PreferenceRow(r.prompt, r.completion, r.completion) for r in rows] if unpaired else rows)
        except DataError as err:  # e.g. chat rows without a chat template: not a property of one row
            encoded, error = [], error or f"{self.path}: {err}"
        kept = {name: [] for name in (("prompt", "completion", "label") if unpaired else ("prompt", "chosen", "rejected"))}
        kept_numbers = []
        raw_lengths = np.zeros((len(encoded), 3), dtype=np.int32)
        for j, (number, (prompt_ids, chosen, rejected, is_prefix)) in enumerate(zip(numbers, encoded)):
            raw_lengths[j] = (len(prompt_ids), len(chosen), len(rejected))
            stats["prompt_not_prefix"] += not is_prefix
            cut = self.pair_tokenizer.truncate(prompt_ids, chosen, rejected)
            if cut is None:
                stats["dropped_truncated"] += 1
                continue
            if not unpaired and cut[1] == cut[2]:  # no preference signal: both completions are the same ids
                stats["identical_completions"] += 1
                stats["identical_after_truncation"] += chosen != rejected
                continue
            stats["truncated"] += (len(cut[0]), len(cut[1]), len(cut[2])) != tuple(raw_lengths[j])
            for name, ids in zip(kept, (*cut[:2], [int(rows[j].label)]) if unpaired else cut):
                kept[name].append(ids)
            kept_numbers.append(number)
        return ChunkResult(np.asarray(kept_numbers, dtype=np.int64), {k: TokenColumn.flatten(v) for k, v in kept.items()},
                           raw_lengths, stats, error, reused, ("unpaired" if unpaired else "pair") if rows else None,
                           chunk[0][0] if chunk else 0)


_worker: ChunkTokenizer | None = None  # this tokenizer process's ChunkTokenizer (set once, by its initializer)
# A chunk of rows/CHUNK_ROWS takes well under a second to tokenize; one still unfinished after this is stuck.
CHUNK_TIMEOUT_S = 600.0
POOL_END_S = 10.0  # how long the tokenizer processes get to heed SIGTERM before they are killed


def _init_worker(chunk_tokenizer: ChunkTokenizer) -> None:
    global _worker
    # Stop signals are the parent's business; the parent ends the pool when it stops.
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
    row in file order is raised (as DataError) even when a later chunk finished first. A file of one chunk is
    tokenized here, without processes; a chunk a process has not finished after CHUNK_TIMEOUT_S is named in a
    DataError and the pool is ended."""
    kind = source_kind(path)
    chunk_tokenizer = ChunkTokenizer(path, kind, pair_tokenizer, skip_bad_rows)
    chunks = row_chunks(path, kind)
    head = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(head, chunks)
    workers = 1 if len(head) < 2 else workers or default_workers()

    def checked(result: ChunkResult) -> ChunkResult:
        if result.error:
            raise DataError(result.error)
        return result

    if workers == 1:
        for chunk in chunks:
            yield checked(chunk_tokenizer(chunk))
        return
    # forkserver: the processes are forks of a fresh server process (which imports this module once), not of
    # this one, so they inherit neither the trainer's signal handlers (a forked worker holding its SIGTERM
    # handler swallowed the pool's terminate and hung the job, issue 24) nor the threads of torch, gloo or the
    # tokenizers, which a fork copies in whatever state they are
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    started_before = set(multiprocessing.active_children())
    pool = context.Pool(workers, _init_worker, (chunk_tokenizer,))
    processes = [p for p in multiprocessing.active_children() if p not in started_before]
    try:
        pending = collections.deque()
        for chunk in itertools.chain(chunks, [None]):
            if chunk is not None:
                pending.append((chunk[0][0], chunk[-1][0], pool.apply_async(_run_worker, (chunk,))))
            while pending and (chunk is None or len(pending) >= 4 * workers):
                first, last, result = pending.popleft()
                try:
                    yield checked(result.get(timeout=CHUNK_TIMEOUT_S))
                except multiprocessing.TimeoutError:
                    raise DataError(f"{location(path, kind, first)}: rows {first}-{last} are still being tokenized "
                                    f"after {CHUNK_TIMEOUT_S:g} s in a tokenizer process: stopped (stuck process; "
                                    f"prepare_workers 1 tokenizes without processes)") from None
    finally:
        _end_pool(pool, processes)


def _end_pool(pool, processes: list) -> None:
    """Pool.terminate, bounded: it sends SIGTERM and then joins every process without a limit, so a process that
    does not heed SIGTERM (stuck in native code, or a handler that swallows it) would hang the job; after
    POOL_END_S such processes are killed."""
    ending = threading.Thread(target=pool.terminate, name="dpo-ds-end-tokenizer-pool", daemon=True)
    ending.start()
    ending.join(POOL_END_S)
    if ending.is_alive():
        for process in processes:
            if process.is_alive():
                process.kill()
        ending.join(POOL_END_S)

