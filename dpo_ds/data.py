"""Preference data: rows -> validated pairs -> token ids (cached by fingerprint) -> sampler -> micro-batches.

Tokenization follows TRL so that results are comparable: ids(prompt) and ids(prompt + completion) are
computed on whole strings and the completion is the tail after len(ids(prompt)); EOS is appended when
missing. Conversational rows go through the tokenizer's chat template (generation prompt on the prompt).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger("dpo_ds")

CACHE_FORMAT = 1  # bump when the tokenized layout changes, so old caches are not reused


class DataError(ValueError):
    """Bad input data, phrased with file, line and field."""


# ----------------------------------------------------------------------------------------------- rows
def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) for each row: location is 'file:line' for JSONL, 'file:row N' otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data file not found")
    if p.is_dir():  # a `datasets.save_to_disk` directory
        import datasets

        for i, row in enumerate(datasets.load_from_disk(str(p))):
            yield f"{path}:row {i + 1}", row
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield f"{path}:row {i + 1}", row
    else:
        with p.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{line_no}", DataError(f"{path}:{line_no}: invalid JSON: {err.msg} (column {err.colno})")


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


# ------------------------------------------------------------------------------------- tokenization
@dataclass
class TokenizedPairs:
    """Token ids of all pairs of one file, in file order; `pair_ids` are the rows' locations."""
    fingerprint: str = ""  # of the file, tokenizer and tokenization settings (set by load_pairs)
    prompt: list[list[int]] = field(default_factory=list)
    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)
    pair_ids: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: {"rows": 0, "skipped_bad_rows": 0,
                                                           "dropped_truncated": 0, "prompt_not_prefix": 0})

    def __len__(self) -> int:
        return len(self.prompt)

    def length(self, i: int) -> int:
        """Tokens of the longer sequence of pair i (what padding is driven by)."""
        return len(self.prompt[i]) + max(len(self.chosen[i]), len(self.rejected[i]))

    def real_tokens(self, i: int) -> int:
        return 2 * len(self.prompt[i]) + len(self.chosen[i]) + len(self.rejected[i])


class PairTokenizer:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None):
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no EOS token; set `eos_token` in its tokenizer_config.json")
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

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

    def _ids(self, text: str, templated: bool) -> list[int]:
        return self.tok(text, add_special_tokens=not templated)["input_ids"]

    def __call__(self, row: PreferenceRow) -> tuple[list[int], list[int], list[int], bool] | None:
        """(prompt ids, chosen ids, rejected ids, prompt-was-a-prefix) or None when truncation leaves nothing."""
        prompt, chosen, rejected, templated = self._texts(row)
        prompt_ids = self._ids(prompt, templated)
        is_prefix = True
        completions = []
        for text in (chosen, rejected):
            full = self._ids(prompt + text, templated)
            is_prefix &= full[: len(prompt_ids)] == prompt_ids
            tail = full[len(prompt_ids):]
            if not tail or tail[-1] != self.tok.eos_token_id:
                tail = tail + [self.tok.eos_token_id]
            completions.append(tail)
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        room = self.max_length - len(prompt_ids)
        if room < 1:
            return None
        return prompt_ids, completions[0][:room], completions[1][:room], is_prefix


def tokenize_file(path: str, pair_tokenizer: PairTokenizer, skip_bad_rows: bool) -> TokenizedPairs:
    out = TokenizedPairs()
    for where, row in read_rows(path):
        out.stats["rows"] += 1
        try:
            pair = validate_row(where, row)
        except DataError as err:
            if not skip_bad_rows:
                raise
            out.stats["skipped_bad_rows"] += 1
            logger.debug("skipping %s", err)
            continue
        tokenized = pair_tokenizer(pair)
        if tokenized is None:
            out.stats["dropped_truncated"] += 1
            continue
        prompt_ids, chosen_ids, rejected_ids, is_prefix = tokenized
        out.stats["prompt_not_prefix"] += not is_prefix
        out.prompt.append(prompt_ids)
        out.chosen.append(chosen_ids)
        out.rejected.append(rejected_ids)
        out.pair_ids.append(where)
    if out.stats["prompt_not_prefix"]:
        logger.warning("%s: in %d pairs the prompt's token ids are not a prefix of prompt+completion's "
                       "(the tokenizer merges across the boundary); the completion is the tail after "
                       "len(ids(prompt)), as in TRL", path, out.stats["prompt_not_prefix"])
    if out.stats["skipped_bad_rows"]:
        logger.warning("%s: skipped %d bad rows (skip_bad_rows)", path, out.stats["skipped_bad_rows"])
    if out.stats["dropped_truncated"]:
        logger.warning("%s: dropped %d pairs whose prompt leaves no completion token within max_length",
                       path, out.stats["dropped_truncated"])
    if not len(out):
        raise DataError(f"{path}: no usable preference pairs")
    return out


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
    parts = [CACHE_FORMAT, file_digest(path), tokenizer_digest(tokenizer), max_length, max_prompt_length, skip_bad_rows]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _save_tokenized(pairs: TokenizedPairs, path: Path) -> None:
    tensors, lengths = {}, {}
    for name in ("prompt", "chosen", "rejected"):
        seqs = getattr(pairs, name)
        tensors[name] = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
        lengths[name] = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        tensors[f"{name}_lengths"] = lengths[name]
    meta = {"pair_ids": json.dumps(pairs.pair_ids), "stats": json.dumps(pairs.stats)}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # readers never see a half-written cache


def _load_tokenized(path: Path) -> TokenizedPairs:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    pairs = TokenizedPairs(pair_ids=json.loads(meta["pair_ids"]), stats=json.loads(meta["stats"]))
    for name in ("prompt", "chosen", "rejected"):
        flat = tensors[name].tolist()
        offsets = [0]
        for n in tensors[f"{name}_lengths"].tolist():
            offsets.append(offsets[-1] + n)
        setattr(pairs, name, [flat[a:b] for a, b in zip(offsets, offsets[1:])])
    return pairs


def load_pairs(path: str, tokenizer, *, max_length: int, max_prompt_length: int | None, skip_bad_rows: bool,
               cache_dir: str | None, rank: int = 0, barrier=lambda: None) -> tuple[TokenizedPairs, str]:
    """Tokenize `path` once (rank 0), cache it by fingerprint, and share it with the other ranks.

    Returns (pairs, fingerprint). A data error on rank 0 is re-raised on every rank after the barrier, so no
    rank waits forever for a cache that will never appear.
    """
    fingerprint = data_fingerprint(path, tokenizer, max_length, max_prompt_length, skip_bad_rows)
    pair_tokenizer = PairTokenizer(tokenizer, max_length, max_prompt_length)
    if cache_dir is None:
        pairs = tokenize_file(path, pair_tokenizer, skip_bad_rows)
        pairs.fingerprint = fingerprint
        return pairs, fingerprint
    cache = Path(cache_dir) / f"pairs-{fingerprint}.safetensors"
    error_file = Path(cache_dir) / f"pairs-{fingerprint}.error"
    if rank == 0:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        error_file.unlink(missing_ok=True)
        if not cache.exists():
            try:
                _save_tokenized(tokenize_file(path, pair_tokenizer, skip_bad_rows), cache)
            except Exception as err:  # any failure: tell the other ranks instead of leaving them at the barrier
                error_file.write_text(str(err) if isinstance(err, DataError) else f"{path}: tokenizing failed: {err!r}")
                barrier()
                raise
    barrier()
    if error_file.exists():
        raise DataError(error_file.read_text())
    pairs = _load_tokenized(cache)
    pairs.fingerprint = fingerprint
    return pairs, fingerprint


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
    """
    lengths: Sequence[int]
    micro_batch_size: int
    grad_accum: int
    world_size: int
    shuffle: bool
    group_by_length: bool
    seed: int
    max_tokens: int | None = None

    @classmethod
    def for_config(cls, cfg, pairs: "TokenizedPairs", world_size: int) -> "PairSampler":
        return cls([pairs.length(i) for i in range(len(pairs))], cfg.micro_batch_size, cfg.gradient_accumulation_steps,
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
            counts[epoch] = len(self._build_micro_batches(epoch)) // self.micro_batches_per_step
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
        """All pairs of the epoch in the order their micro-batches are used (unused ones last)."""
        batches = self._micro_batches(epoch)
        used = [i for batch in batches for i in batch]
        rest = sorted(set(range(len(self.lengths))) - set(used), key=self._shuffled(epoch).index)
        return used + rest

    def _shuffled(self, epoch: int) -> list[int]:
        n = len(self.lengths)
        return torch.randperm(n, generator=self._generator(epoch)).tolist() if self.shuffle else list(range(n))

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_batches = epoch, self._build_micro_batches(epoch)
        return self._cached_batches

    def _build_micro_batches(self, epoch: int) -> list[list[int]]:
        order = self._shuffled(epoch)
        b = self.micro_batch_size
        if not (self.group_by_length or self.max_tokens):
            return [order[i:i + b] for i in range(0, len(order) - b + 1, b)]
        # Sort within windows of 64 micro-batches, cut into micro-batches of similar length, then shuffle the
        # micro-batches (seeded, also when shuffle is off) so steps do not run from long to short.
        batches = []
        window = 64 * b
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i], reverse=True)
            batches += self._pack(chunk) if self.max_tokens else [chunk[i:i + b] for i in range(0, len(chunk) - b + 1, b)]
        g = self._generator(epoch)
        g.manual_seed(g.initial_seed() + 1)  # the block shuffle must not repeat the pair permutation
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def _pack(self, by_length_desc: list[int]) -> list[list[int]]:
        """Greedy token-budget packing of pairs sorted longest first: a micro-batch holds n pairs while
        2 * n * (its longest pair) <= max_tokens, and always at least one pair."""
        batches, current = [], []
        for i in by_length_desc:
            longest = self.lengths[current[0]] if current else self.lengths[i]
            if current and 2 * (len(current) + 1) * longest > self.max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        return batches + ([current] if current else [])

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The grad_accum micro-batches (lists of pair indices) of global optimizer step `step` on `rank`."""
        epoch, k = self._locate(step)
        batches = self._micro_batches(epoch)
        base = k * self.micro_batches_per_step
        return [batches[base + m * self.world_size + rank] for m in range(self.grad_accum)]

    def pairs_in_step(self, step: int) -> int:
        epoch, k = self._locate(step)
        base = k * self.micro_batches_per_step
        return sum(len(b) for b in self._micro_batches(epoch)[base:base + self.micro_batches_per_step])

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
    seqs, masks = [], []
    for completions in (pairs.chosen, pairs.rejected):
        for i in indices:
            prompt, completion = pairs.prompt[i], completions[i]
            seqs.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
    if packed:
        # A sequence's first token is never scored (nothing precedes it), as in a padded row.
        return {"input_ids": torch.tensor([[t for s in seqs for t in s]]),
                "position_ids": torch.tensor([[p for s in seqs for p in range(len(s))]]),
                "loss_mask": torch.tensor([[bool(m) and p > 0 for ms in masks for p, m in enumerate(ms)]]),
                "sequence_ids": torch.tensor([[j for j, s in enumerate(seqs) for _ in s]])}
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[row, : len(s)] = torch.tensor(s)
        attention_mask[row, : len(s)] = 1
        loss_mask[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
