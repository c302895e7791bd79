"""Sequence log-probabilities of completions, without a full fp32 log-softmax over the vocabulary.

Token log-prob = logit[target] - logsumexp(logits), computed over chunks of sequence positions by an
autograd function whose backward also works chunk by chunk: (onehot(target) - softmax) * grad, written
straight into the logits' gradient. Beyond the logits and their gradient (in the model's dtype), at most
one chunk of fp32 values exists at a time, in the forward and in the backward pass.
"""
from __future__ import annotations

import torch


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
        out = torch.empty(targets.shape, dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[1], chunk_size):
            part = logits[:, start:start + chunk_size].to(dtype)
            index = targets[:, start:start + chunk_size, None]
            out[:, start:start + chunk_size] = part.gather(-1, index).squeeze(-1) - part.logsumexp(-1)
        ctx.save_for_backward(logits, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[1], ctx.chunk_size):
            part = slice(start, start + ctx.chunk_size)
            g = grad_out[:, part, None]
            chunk = torch.softmax(logits[:, part].to(g.dtype), -1).mul_(-g)
            chunk.scatter_add_(-1, targets[:, part, None], g)
            grad[:, part] = chunk
        return grad, None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """log softmax(logits)[target] at every position [N, T] (fp32, or fp64 for fp64 logits)."""
    return _ChunkedTokenLogps.apply(logits, targets, chunk_size)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 256,
                   sequence_ids: torch.Tensor | None = None, num_sequences: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, completion-token counts) per sequence.

    logits [N, T, V] at position t predict input_ids[:, t + 1]; loss_mask [N, T] marks completion tokens.
    Right-padded batches: one sequence per row, results [N]. Packed batches (`sequence_ids` [N, T] gives each
    position's sequence): results [num_sequences].
    """
    # Score every position against the next token (the last against a dummy, never counted) so the logits are
    # used whole: a slice would make autograd build a full-size zero gradient for them.
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    mask = torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], dim=1)
    # where, not multiply: a NaN/Inf at a padding position must not reach the sum (0 * NaN = NaN)
    scored = torch.where(mask, token_logps(logits, next_ids, chunk_size), 0.0)
    if sequence_ids is None:
        return scored.sum(-1), mask.sum(-1).float()
    # a score belongs to the sequence of the token it predicts
    segments = torch.cat([sequence_ids[:, 1:], sequence_ids[:, -1:]], dim=1).reshape(-1)
    sums = scored.new_zeros(num_sequences).index_add(0, segments, scored.reshape(-1))
    counts = torch.zeros(num_sequences, device=mask.device).index_add_(0, segments, mask.reshape(-1).float())
    return sums, counts
