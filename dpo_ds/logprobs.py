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


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                   chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs [N], completion-token counts [N]) for right-padded sequences.

    logits [N, T, V] at position t predict input_ids[:, t + 1]; loss_mask [N, T] marks completion tokens.
    """
    logits = logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:]
    sums = logits.new_zeros(logits.shape[0], dtype=torch.float32)
    for start in range(0, logits.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        if logits.requires_grad:
            token_logps = checkpoint(_token_logps, logits[:, part], targets[:, part], use_reentrant=False)
        else:
            token_logps = _token_logps(logits[:, part], targets[:, part])
        sums = sums + (token_logps * mask[:, part]).sum(-1)
    return sums, mask.sum(-1).float()
