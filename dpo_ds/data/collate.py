"""Collation: the token ids of a micro-batch's examples -> the tensors of one forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dpo_ds.data.examples import TokenizedExamples


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: which examples (`indices` into `examples`) and their collated tensors (`collate`)."""
    examples: TokenizedExamples
    indices: Sequence[int]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, examples: TokenizedExamples, indices: Sequence[int], pad_id: int, packed: bool) -> MicroBatch:
        return cls(examples, indices, collate(examples, indices, pad_id, packed))

    @property
    def num_sequences(self) -> int:  # every scored sequence of each example (packed: all in one row)
        return self.examples.sequences_per_example() * len(self.indices)


def collate(examples: TokenizedExamples, indices: Sequence[int], pad_id: int, packed: bool = False
            ) -> dict[str, torch.Tensor]:
    """The scored sequences of B examples, slot by slot: for pairs, the 2B sequences prompt+chosen of each pair,
    then prompt+rejected of each pair.

    Right-padded (default): one sequence per row (for pairs, rows [0, B) chosen and [B, 2B) rejected), with an
    attention mask. Packed (`padding_free`): all sequences in one row with no padding, position ids restarting at
    each sequence and `sequence_ids` naming each position's sequence; transformers then masks attention to
    each sequence (flash-attention varlen where available, a block-diagonal causal mask otherwise).
    `loss_mask` is 1 exactly on completion tokens (never on prompt or padding).
    """
    seqs = [examples.sequence(slot, i) for slot in range(examples.sequences_per_example()) for i in indices]
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

