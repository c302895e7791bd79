"""The prepared-data store: token ids of a file, prepared once into a memory-mapped cache shared by all ranks.

Preparation (`prepare_pairs`, run by `dpo-ds prepare` and by rank 0 of `train`/`eval` when the cache is
missing) streams the file in chunks of rows to worker processes (dpo_ds.data.tokenize), which validate and
batch-tokenize them; the results come back in file order and are appended to flat int32 token files with int64
offsets, one pair per example's token columns. Every rank memory-maps those files read-only, so a node holds
one copy in its page cache and no rank holds per-token Python objects. A cache directory is named by the
fingerprint of the file, the tokenizer and the tokenization settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dpo_ds.data.examples import EXAMPLE_KINDS, RowLocations, TokenColumn, TokenizedExamples, TokenizedPairs, empty_stats
from dpo_ds.data.report import length_report, warn_about
from dpo_ds.data.rows import DataError, location, source_kind
from dpo_ds.parallel import Parallel
from dpo_ds.data.tokenize import TOKENIZATION_VERSION, ChunkResult, PairTokenizer, tokenized_chunks

logger = logging.getLogger("dpo_ds")

CACHE_FORMAT = 2          # the on-disk layout of a prepared cache (part of its directory name)


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


META = "meta.json"  # written last: its presence with matching file sizes is the completeness marker
ROWS_FILE = "rows.i64"  # the line (JSONL) or row number each example came from


def cache_files(columns: tuple[str, ...]) -> dict[str, str]:
    """File name -> numpy dtype of a cache holding these token columns: a column's ids in <name>.ids, its n+1
    offsets in <name>.offsets."""
    return {**{f"{c}.ids": "<i4" for c in columns}, **{f"{c}.offsets": "<i8" for c in columns}, ROWS_FILE: "<i8"}


class CacheWriter:
    """Appends ChunkResults to the flat files of a cache directory being built, for examples of kind `example`."""

    def __init__(self, directory: Path, example: type[TokenizedExamples] = TokenizedPairs):
        directory.mkdir(parents=True)
        self.directory, self.example = directory, example
        self.files = {name: (directory / name).open("wb") for name in cache_files(example.COLUMNS)}
        self.ends = dict.fromkeys(example.COLUMNS, 0)  # tokens written per column
        for c in example.COLUMNS:
            self.files[f"{c}.offsets"].write(np.zeros(1, "<i8").tobytes())
        self.examples = 0

    def add(self, result: ChunkResult) -> None:
        for c in self.example.COLUMNS:
            flat, lengths = result.columns[c]
            self.files[f"{c}.ids"].write(flat.astype("<i4", copy=False).tobytes())
            self.files[f"{c}.offsets"].write((self.ends[c] + np.cumsum(lengths)).astype("<i8").tobytes())
            self.ends[c] += int(lengths.sum())
        self.files[ROWS_FILE].write(result.numbers.astype("<i8", copy=False).tobytes())
        self.examples += len(result.numbers)

    def close(self, meta: dict | None) -> None:
        """Make the files durable and write the completeness marker (meta None: abandon, close only)."""
        for fh in self.files.values():
            if meta is not None:
                fh.flush()
                os.fsync(fh.fileno())
            fh.close()
        if meta is None:
            return
        meta = {**meta, "format": CACHE_FORMAT, "example": self.example.KIND, "pairs": self.examples,
                "tokens": self.ends, "file_bytes": {name: (self.directory / name).stat().st_size for name in self.files}}
        (self.directory / META).write_text(json.dumps(meta, indent=1))


def _map(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _example_kind(meta: dict) -> type[TokenizedExamples] | None:
    return EXAMPLE_KINDS.get(meta.get("example", TokenizedPairs.KIND))  # caches before the field held pairs


def cache_problem(cache: Path, fingerprint: str) -> str | None:
    """Why `cache` cannot be used as the prepared examples of `fingerprint` (None: it is complete and matches)."""
    try:
        meta = json.loads((cache / META).read_text())
    except FileNotFoundError:
        return f"no {META} (an interrupted preparation)"
    except (OSError, ValueError) as err:
        return f"unreadable {META} ({err})"
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
        return f"written for format {meta.get('format')}, fingerprint {meta.get('fingerprint')}"
    example = _example_kind(meta)
    if example is None:
        return f"holds examples of an unknown kind {meta['example']!r}"
    n, tokens = meta["pairs"], meta["tokens"]
    expected = {**{f"{c}.ids": 4 * tokens[c] for c in example.COLUMNS},
                **{f"{c}.offsets": 8 * (n + 1) for c in example.COLUMNS}, ROWS_FILE: 8 * n}
    for name, size in expected.items():
        path = cache / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size or meta["file_bytes"].get(name) != size:
            return f"{name} has {actual} bytes, {size} expected (truncated or modified)"
    for c in example.COLUMNS:
        offsets = _map(cache / f"{c}.offsets", "<i8")
        if offsets[0] != 0 or offsets[-1] != tokens[c] or (n and (np.diff(offsets) < 0).any()):
            return f"{c}.offsets do not describe {c}.ids"
    return None


def open_cache(cache: Path) -> TokenizedExamples:
    """A complete cache (check with cache_problem first), memory-mapped read-only."""
    meta = json.loads((cache / META).read_text())
    example = _example_kind(meta)
    columns = {c: TokenColumn(_map(cache / f"{c}.ids", "<i4"), _map(cache / f"{c}.offsets", "<i8"))
               for c in example.COLUMNS}
    return example.from_store(columns, RowLocations(meta["source"], meta["kind"], _map(cache / ROWS_FILE, "<i8")),
                              fingerprint=meta["fingerprint"], stats=meta["stats"], report=meta["report"],
                              cache_path=str(cache))


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
    writer = None  # made at the first chunk, for the kind of example its rows are
    try:
        stats, raw, encoded_once = empty_stats(), [], 0
        with _progress(path) as bar:
            for result in tokenized_chunks(path, pair_tokenizer, skip_bad_rows, workers):
                if writer is None and result.kind is not None:
                    writer = CacheWriter(tmp, EXAMPLE_KINDS[result.kind])
                elif result.kind is not None and result.kind != writer.example.KIND:
                    raise DataError(f"{location(path, source_kind(path), result.first_row)}: field "
                                    f"'{'label' if result.kind == 'unpaired' else 'chosen'}': rows of kind "
                                    f"{result.kind} after rows of kind {writer.example.KIND}; a file holds "
                                    f"preference pairs (prompt, chosen, rejected) or unpaired rows (prompt, "
                                    f"completion, label), not both")
                if result.kind is not None:
                    writer.add(result)
                raw.append(result.raw_lengths)
                for k, v in result.stats.items():
                    stats[k] += v
                encoded_once += result.prompts_encoded_once
                bar.update(len(result.numbers))
        report = length_report(np.concatenate(raw) if raw else np.zeros((0, 3), np.int32), pair_tokenizer.max_length,
                               pair_tokenizer.max_prompt_length)
        if writer is None or not writer.examples:  # say why (truncation, identical completions, bad rows) before failing
            if writer is not None:
                writer.close(None)
            warn_about(TokenizedPairs(stats=stats, report=report), path)
            raise DataError(f"{path}: no usable examples")
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
        if writer is not None:
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
    """A bar on a terminal only: in a log file (a Slurm job's) its carriage returns would make one long line; the
    `prepared N pairs` line that follows says the same."""
    from tqdm import tqdm

    return tqdm(desc=f"preparing {Path(path).name}", unit=" pairs", dynamic_ncols=True, mininterval=2.0,
                disable=not (logger.isEnabledFor(logging.INFO) and sys.stderr.isatty()))


def tokenize_file(path: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool, workers: int = 1) -> TokenizedPairs:
    """All pairs of `path` without a lasting cache: prepared into a temporary directory that is gone when this
    returns (the arrays stay mapped)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dpo-ds-pairs-") as tmp:
        return prepare_pairs(path, pair_tokenizer, skip_bad_rows, Path(tmp) / "pairs", "", workers)


def load_pairs(path: str, tokenizer, *, max_length: int, max_prompt_length: int | None, skip_bad_rows: bool,
               cache_dir: str | None, parallel: Parallel = Parallel(), workers: int = 0) -> tuple[TokenizedPairs, str]:
    """The prepared pairs of `path`, shared by all ranks through `cache_dir`. Returns (pairs, fingerprint).

    Rank 0 prepares the cache when it is missing (in parallel processes) while the other ranks wait for it
    outside any timed collective (Parallel.on_rank0: a preparation longer than the process group's timeout is
    fine, and a failure on rank 0 is raised on every rank); then every rank maps the same files."""
    fingerprint = data_fingerprint(path, tokenizer, max_length, max_prompt_length, skip_bad_rows)
    pair_tokenizer = PairTokenizer(tokenizer, max_length, max_prompt_length)
    if cache_dir is None:
        pairs = tokenize_file(path, pair_tokenizer, skip_bad_rows, workers)
        pairs.fingerprint = fingerprint
        return pairs, fingerprint
    cache = cache_path(cache_dir, fingerprint)

    def prepare() -> None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        prepare_pairs(path, pair_tokenizer, skip_bad_rows, cache, fingerprint, workers)

    parallel.on_rank0(f"preparing {path} into {cache}", prepare, DataError)
    return open_cache(cache), fingerprint
