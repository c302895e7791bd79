"""Sequence log-probabilities of completions, without a full fp32 log-softmax over the vocabulary.

Token log-prob = logit[target] - logsumexp(logits). It is computed in chunks of sequence positions, each
under activation checkpointing, so at most one chunk of fp32 logits exists at a time, in the forward pass
and again in the backward pass.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 256,
                   sequence_ids: torch.Tensor | None = None, num_sequences: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, completion-token counts) per sequence.

    logits [N, T, V] at position t predict input_ids[:, t + 1]; loss_mask [N, T] marks completion tokens.
    Right-padded batches: one sequence per row, results [N]. Packed batches (`sequence_ids` [N, T] gives each
    position's sequence): results [num_sequences].
    """
    logits = logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:]
    packed = sequence_ids is not None
    n = num_sequences if packed else logits.shape[0]
    segments = sequence_ids[:, 1:] if packed else None  # a score belongs to the sequence of the token it predicts
    sums = logits.new_zeros(n, dtype=torch.float32)
    for start in range(0, logits.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        if logits.requires_grad:
            token_logps = checkpoint(_token_logps, logits[:, part], targets[:, part], use_reentrant=False)
        else:
            token_logps = _token_logps(logits[:, part], targets[:, part])
        # where, not multiply: a NaN/Inf at a padding position must not reach the sum (0 * NaN = NaN)
        scored = torch.where(mask[:, part], token_logps, 0.0)
        sums = sums.index_add(0, segments[:, part].reshape(-1), scored.reshape(-1)) if packed else sums + scored.sum(-1)
    if packed:
        counts = torch.zeros(n, device=mask.device).index_add_(0, segments.reshape(-1), mask.reshape(-1).float())
        return sums, counts
    return sums, mask.sum(-1).float()
