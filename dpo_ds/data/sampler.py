"""The sampler: which examples each rank uses at each optimizer step, and where in the data a run is."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from dpo_ds.data.examples import TokenizedExamples
from dpo_ds.parallel import Parallel


@dataclass
class PairSampler:
    """Which pairs each rank uses at each optimizer step; the one place that knows where a run is.

    Each epoch is cut into micro-batches; optimizer step k of the epoch uses micro-batches
    [k*M, (k+1)*M), M = grad_accum * W (W = data_parallel_size: the ranks reading different data), micro-step m on
    data-parallel rank r taking number k*M + m*W + r.
    With fixed-size micro-batches of B pairs cut from the epoch order, step k therefore uses positions
    [k*G, (k+1)*G) of that order (G = B * M), and micro-step m on rank r the B positions from (m*W + r)*B.
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
    data_parallel_size: int
    shuffle: bool
    group_by_length: bool
    seed: int
    max_tokens: int | None = None
    # caches, not configuration: the last epoch's micro-batches, and steps per epoch under a token budget
    _cached_plan: tuple[int, tuple[np.ndarray, np.ndarray]] | None = field(default=None, init=False, repr=False,
                                                                             compare=False)
    _steps_by_epoch: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.lengths = np.asarray(self.lengths, dtype=np.int64)

    @classmethod
    def for_config(cls, cfg, examples: TokenizedExamples, data_parallel_size: int) -> "PairSampler":
        return cls(examples.lengths(), cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                   data_parallel_size, cfg.shuffle, cfg.group_by_length, cfg.seed, cfg.max_tokens_per_micro_batch)

    @property
    def micro_batches_per_step(self) -> int:
        return self.grad_accum * self.data_parallel_size

    @property
    def pairs_per_step(self) -> int:
        """Pairs of one step with fixed-size micro-batches (the nominal count under a token budget)."""
        return self.micro_batch_size * self.micro_batches_per_step

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.max_tokens:  # fixed-size micro-batches: n // B full ones, whatever the order
            return len(self.lengths) // self.pairs_per_step
        # Under a token budget the count depends on the epoch's order: build it once per epoch, not per step.
        if epoch not in self._steps_by_epoch:
            self._steps_by_epoch[epoch] = (len(self._cut_epoch(epoch)[1]) - 1) // self.micro_batches_per_step
        return self._steps_by_epoch[epoch]

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
        used, _ = self._epoch_plan(epoch)
        shuffled = self._shuffled(epoch)
        is_used = np.zeros(len(self.lengths), dtype=bool)
        is_used[used] = True
        return np.concatenate([used, shuffled[~is_used[shuffled]]]).tolist()

    def _shuffled(self, epoch: int) -> np.ndarray:
        n = len(self.lengths)
        return torch.randperm(n, generator=self._generator(epoch)).numpy() if self.shuffle else np.arange(n)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached_plan is None or self._cached_plan[0] != epoch:
            self._cached_plan = (epoch, self._cut_epoch(epoch))
        return self._cached_plan[1]

    def _cut_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
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

    def _micro_batch(self, epoch: int, j: int) -> list[int]:
        indices, bounds = self._epoch_plan(epoch)
        return indices[bounds[j]:bounds[j + 1]].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The grad_accum micro-batches (lists of pair indices) of global optimizer step `step` on data-parallel
        rank `rank` (every rank of one sequence-parallel group reads the same ones)."""
        epoch, k = self._locate(step)
        base = k * self.micro_batches_per_step
        return [self._micro_batch(epoch, base + m * self.data_parallel_size + rank) for m in range(self.grad_accum)]

    def pairs_in_step(self, step: int) -> int:
        epoch, k = self._locate(step)
        bounds = self._epoch_plan(epoch)[1]
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


def rank_shares(num_pairs: int, micro_batch_size: int, parallel: Parallel) -> Iterator[list[int]]:
    """One pass over all pairs split over the data-parallel ranks, for scoring (eval, reference precompute): this
    rank's pair indices per forward. Every rank gets the same number of forwards, as ZeRO-3's collective parameter
    gathers require; a rank with no pairs left gets [] (run pair 0 and discard it)."""
    b, rank = micro_batch_size, parallel.data_parallel_rank
    for start in range(0, num_pairs, b * parallel.data_parallel_size):
        yield list(range(start + rank * b, min(start + (rank + 1) * b, num_pairs)))

