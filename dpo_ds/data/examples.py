"""The example unit: one file's training examples as ragged token columns, and what one example is scored as.

Storage, the sampler, collation and the reference cache work on `TokenizedExamples`; a kind of example declares
its token COLUMNS and the SEQUENCES it is scored as, each a (prompt column, completion column). A preference
pair (`TokenizedPairs`) stores prompt, chosen and rejected and is scored as [prompt+chosen, prompt+rejected]; an
unpaired, labelled completion (`TokenizedUnpaired`, KTO) is scored as [prompt+completion, prompt+another
example's completion] (the mismatched pair of KTO's KL reference point). What the step does with the scored
sequences (split them into chosen and rejected, or into completion and mismatched completion) is the step's
business.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from dpo_ds.data.rows import DataError, location

# Counters of a preparation (dpo_ds.data.tokenize), kept with the prepared examples.
STAT_KEYS = ("rows", "skipped_bad_rows", "dropped_truncated", "truncated", "prompt_not_prefix",
             "identical_completions", "identical_after_truncation")


def empty_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


class TokenColumn:
    """Ragged token sequences: sequence i is flat[offsets[i]:offsets[i+1]] (int32 ids, int64 offsets; memory-mapped
    read-only when they come from a prepared cache). Indexing gives a numpy view, never a copy."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @staticmethod
    def flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 ids, int64 lengths) of `seqs`."""
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum())), lengths

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "TokenColumn":
        flat, lengths = cls.flatten(seqs)
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class RowLocations(SequenceABC):
    """The examples' 'file:line' / 'file:row N' names, made on access from one int64 number per example."""

    def __init__(self, path: str, kind: str, numbers: np.ndarray):
        self.path, self.kind, self.numbers = path, kind, numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return location(self.path, self.kind, int(self.numbers[i]))


class TokenizedExamples:
    """Token ids of all examples of one file, in file order (see the module docstring)."""
    KIND: ClassVar[str]
    NOUN: ClassVar[str]                                # what one example is called in messages
    COLUMNS: ClassVar[tuple[str, ...]]                 # token columns stored per example
    SEQUENCES: ClassVar[tuple[tuple[str, str], ...]]   # (prompt column, completion column) of each scored sequence

    @classmethod
    def from_store(cls, columns: dict[str, TokenColumn], ids: Sequence[str], **info) -> "TokenizedExamples":
        """The examples of a prepared cache: its token columns, the examples' row names, and `info` (fingerprint,
        stats, report, cache_path)."""
        raise NotImplementedError

    def column(self, name: str) -> TokenColumn:
        return getattr(self, name)

    def __len__(self) -> int:
        return len(self.column(self.COLUMNS[0]))

    def counted(self, n: int | None = None) -> str:
        """'12 pairs', '1 example': `n` (default: all of them) of these examples, named."""
        n = len(self) if n is None else n
        return f"{n} {self.NOUN}{'' if n == 1 else 's'}"

    @classmethod
    def sequences_per_example(cls) -> int:
        return len(cls.SEQUENCES)

    def sequence(self, slot: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, completion ids) of scored sequence `slot` of example i."""
        prompt, completion = self.SEQUENCES[slot]
        return self.column(prompt)[i], self.column(completion)[i]

    def _sequence_lengths(self) -> np.ndarray:
        """[examples, sequences]: tokens of each scored sequence (prompt + completion), int64."""
        return np.stack([self.column(p).lengths + self.column(c).lengths for p, c in self.SEQUENCES], axis=1)

    def lengths(self) -> np.ndarray:
        """Tokens of each example's longest scored sequence (what padding is driven by), int64."""
        return self._sequence_lengths().max(axis=1)

    def length(self, i: int) -> int:
        """Tokens of example i's longest scored sequence."""
        return max(len(p) + len(c) for p, c in (self.sequence(s, i) for s in range(len(self.SEQUENCES))))

    def real_tokens(self, i: int) -> int:
        """Tokens of example i's scored sequences together (what one forward over them processes, unpadded)."""
        return sum(len(p) + len(c) for p, c in (self.sequence(s, i) for s in range(len(self.SEQUENCES))))

    @property
    def stored_tokens(self) -> int:
        return sum(len(self.column(c).flat) for c in self.COLUMNS)


@dataclass
class TokenizedPairs(TokenizedExamples):
    """Preference pairs: prompt, chosen and rejected TokenColumns (lists of id lists are converted, for tests and
    synthetic data); `pair_ids` name the rows they came from."""
    KIND: ClassVar[str] = "pair"
    NOUN: ClassVar[str] = "pair"
    COLUMNS: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    SEQUENCES: ClassVar[tuple[tuple[str, str], ...]] = (("prompt", "chosen"), ("prompt", "rejected"))

    fingerprint: str = ""  # of the file, tokenizer and tokenization settings (set by load_pairs)
    prompt: Any = field(default_factory=list)
    chosen: Any = field(default_factory=list)
    rejected: Any = field(default_factory=list)
    pair_ids: Sequence[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=empty_stats)
    report: dict = field(default_factory=dict)  # length percentiles (length_report), when prepared from a file
    cache_path: str | None = None

    @classmethod
    def from_store(cls, columns: dict[str, TokenColumn], ids: Sequence[str], **info) -> "TokenizedPairs":
        return cls(pair_ids=ids, **columns, **info)

    def __post_init__(self):
        for name in self.COLUMNS:
            if not isinstance(getattr(self, name), TokenColumn):
                setattr(self, name, TokenColumn.from_lists(getattr(self, name)))


class _SplitNames(SequenceABC):
    """Names of split pairs' examples: 'file:line (chosen)' / 'file:line (rejected)'."""

    def __init__(self, names: Sequence[str], source: np.ndarray, completions: tuple[str, ...]):
        self.names, self.source, self.completions = names, source, completions

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        column, row = self.source[i]
        return f"{self.names[int(row)]} ({self.completions[int(column)]})"


class TokenizedUnpaired(TokenizedExamples):
    """Labelled single completions (KTO). Example i is prompt row source[i, 1] with the completion of column
    source[i, 0] of that row, and `labels[i]` (True: desirable). It is scored as [prompt+completion,
    prompt+mismatched completion], the mismatched completion being the completion of example i - `shift`
    (cyclic; `shift` = examples per data row, so it comes from another data row): a fixed partner per
    example, as TRL's KTO fixes its KL dataset before training, so precompute_ref caches the mismatched pairs'
    reference log-probs too and a resumed run sees the same ones.

    Built from preference pairs by `split_pairs` (TRL's unpair_preference_dataset: chosen -> desirable, rejected
    -> undesirable), the token columns are the pairs' own (no copy)."""
    KIND: ClassVar[str] = "unpaired"
    NOUN: ClassVar[str] = "example"
    # an unpaired file's cache: its label is a one-id column (1 = desirable), so the store's files stay token columns
    COLUMNS: ClassVar[tuple[str, ...]] = ("prompt", "completion", "label")
    SEQUENCES: ClassVar[tuple[tuple[str, str], ...]] = (("prompt", "completion"), ("prompt", "mismatched"))

    def __init__(self, prompt: TokenColumn, completions: tuple[TokenColumn, ...], source: np.ndarray,
                 labels: np.ndarray, shift: int, pair_ids: Sequence[str], fingerprint: str, **info):
        self.prompt, self.completions, self.source, self.labels, self.shift = prompt, completions, source, labels, shift
        self.pair_ids = pair_ids  # each example's name, as TokenizedPairs names its pairs
        self.fingerprint = fingerprint
        self.stats = info.get("stats", empty_stats())
        self.report, self.cache_path = info.get("report", {}), info.get("cache_path")

    @classmethod
    def from_store(cls, columns: dict[str, TokenColumn], ids: Sequence[str], **info) -> "TokenizedUnpaired":
        n = len(columns["completion"])
        source = np.stack([np.zeros(n, np.int64), np.arange(n, dtype=np.int64)], axis=1)
        return cls(columns["prompt"], (columns["completion"],), source, np.asarray(columns["label"].flat, bool), 1,
                   ids, info.pop("fingerprint"), **info)

    def column(self, name: str) -> TokenColumn:
        """A stored column (COLUMNS) of an unpaired file's examples; split pairs store none of their own."""
        if len(self.completions) != 1:
            raise ValueError("split pairs have no unpaired columns: read their pairs' columns")
        if name == "label":
            return TokenColumn.from_lists([[int(v)] for v in self.labels])
        return {"prompt": self.prompt, "completion": self.completions[0]}[name]

    @classmethod
    def split_pairs(cls, pairs: TokenizedPairs) -> "TokenizedUnpaired":
        """Each pair as two examples in pair order: its chosen completion (desirable), its rejected (undesirable)."""
        n = len(pairs)
        source = np.stack([np.tile([0, 1], n), np.repeat(np.arange(n), 2)], axis=1).astype(np.int64)
        labels = np.tile([True, False], n)
        return cls(pairs.prompt, (pairs.chosen, pairs.rejected), source, labels, 2,
                   _SplitNames(pairs.pair_ids, source, ("chosen", "rejected")), f"{pairs.fingerprint}-split-unpaired",
                   stats=pairs.stats, report=pairs.report, cache_path=pairs.cache_path)

    def __len__(self) -> int:
        return len(self.labels)

    def mismatched(self, i: int) -> int:
        """The example whose completion is example i's mismatched completion."""
        return (i - self.shift) % len(self)

    def _completion(self, i: int) -> np.ndarray:
        column, row = self.source[i]
        return self.completions[column][row]

    def sequence(self, slot: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        prompt = self.prompt[self.source[i, 1]]
        return prompt, self._completion(i if slot == 0 else self.mismatched(i))

    def _sequence_lengths(self) -> np.ndarray:
        prompts = self.prompt.lengths[self.source[:, 1]]
        completions = np.stack([c.lengths for c in self.completions])[self.source[:, 0], self.source[:, 1]]
        mismatched = np.roll(completions, self.shift)  # example i's mismatched completion is example i - shift's
        return np.stack([prompts + completions, prompts + mismatched], axis=1)

    @property
    def stored_tokens(self) -> int:
        labels = len(self) if len(self.completions) == 1 else 0  # an unpaired file's one-id label column
        return len(self.prompt.flat) + sum(len(c.flat) for c in self.completions) + labels


def for_unit(examples: TokenizedExamples, unit: str, path: str, loss_type: str) -> TokenizedExamples:
    """The examples a loss of `unit` (LossSpec.unit) trains on: preference pairs as they are, or split into
    unpaired examples for an unpaired loss; unpaired rows for a loss on pairs are refused (DataError)."""
    if unit == "unpaired" and isinstance(examples, TokenizedPairs):
        return TokenizedUnpaired.split_pairs(examples)
    if unit == "pair" and examples.KIND == "unpaired":
        raise DataError(f"{path}: field 'label': the rows are unpaired (prompt, completion, label); loss_type "
                        f"{loss_type} trains on preference pairs (prompt, chosen, rejected): use loss_type kto")
    return examples


# kind -> class, for caches that record which kind of example they hold
EXAMPLE_KINDS: dict[str, type[TokenizedExamples]] = {TokenizedPairs.KIND: TokenizedPairs,
                                                     TokenizedUnpaired.KIND: TokenizedUnpaired}
