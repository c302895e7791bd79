"""The example unit: one file's training examples as ragged token columns, and what one example is scored as.

Storage, the sampler, collation and the reference cache work on `TokenizedExamples`; a kind of example declares
its token COLUMNS and the SEQUENCES it is scored as, each a (prompt column, completion column). A preference
pair (`TokenizedPairs`) stores prompt, chosen and rejected and is scored as [prompt+chosen, prompt+rejected]; an
unpaired, labelled completion would store prompt and completion and be scored as [prompt+completion]. What the
step does with the scored sequences (split them into chosen and rejected, say) is the step's business.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from dpo_ds.data.rows import location

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


# kind -> class, for caches that record which kind of example they hold
EXAMPLE_KINDS: dict[str, type[TokenizedExamples]] = {TokenizedPairs.KIND: TokenizedPairs}
