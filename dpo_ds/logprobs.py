"""Sequence log-probabilities of completions, without a full fp32 log-softmax over the vocabulary.

Token log-prob = logit[target] - logsumexp(logits). Two paths compute it:

- From logits (`sequence_logps`): an autograd function over chunks of sequence positions whose backward also
  works chunk by chunk: (onehot(target) - softmax) * grad, written straight into the logits' gradient. Beyond
  the logits and their gradient (in the model's dtype), at most one chunk of fp32 values exists at a time.
- Inside the output projection (`head_sequence_logps`, used in place of the model's lm_head): only the
  completion positions are projected, chunk by chunk, so the [tokens, vocab] logits and their gradient never
  exist whole. The forward keeps each position's logsumexp; the backward recomputes the logits one vocabulary
  chunk at a time, each chunk's weight gradient being one matmul over all scored positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _log_sum_squares(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 of softmax(logits) over the last dimension, lse = logits.logsumexp(-1): WPO's per-token
    normaliser (the log-probability that two samples of the next-token distribution agree)."""
    return (2 * logits).logsumexp(-1) - 2 * lse


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] at every position; with `squares`, also log sum_v p_v^2 there (no gradient)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int, squares: bool = False):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
        out = torch.empty(targets.shape, dtype=dtype, device=logits.device)
        sum_squares = torch.empty(targets.shape if squares else 0, dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[1], chunk_size):
            part = logits[:, start:start + chunk_size].to(dtype)
            index = targets[:, start:start + chunk_size, None]
            lse = part.logsumexp(-1)
            out[:, start:start + chunk_size] = part.gather(-1, index).squeeze(-1) - lse
            if squares:
                sum_squares[:, start:start + chunk_size] = _log_sum_squares(part, lse)
        ctx.save_for_backward(logits, targets)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(sum_squares)
        return out, sum_squares

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_squares):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[1], ctx.chunk_size):
            part = slice(start, start + ctx.chunk_size)
            g = grad_out[:, part, None]
            chunk = torch.softmax(logits[:, part].to(g.dtype), -1).mul_(-g)
            chunk.scatter_add_(-1, targets[:, part, None], g)
            grad[:, part] = chunk
        return grad, None, None, None


class _HeadTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] at K positions: hidden [K, d], weight [V, d], targets [K]; with
    `squares`, also log sum_v p_v^2 at each (no gradient), from the same logits blocks."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                squares: bool = False):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(targets.shape, dtype=dtype, device=hidden.device)
        lse = torch.empty(targets.shape, dtype=dtype, device=hidden.device)
        sum_squares = torch.empty(targets.shape if squares else 0, dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            logits = (hidden[part] @ weight.T).to(dtype)
            lse[part] = logits.logsumexp(-1)
            out[part] = logits.gather(-1, targets[part, None]).squeeze(-1) - lse[part]
            if squares:
                sum_squares[part] = _log_sum_squares(logits, lse[part])
        ctx.save_for_backward(hidden, weight, targets, lse)
        # the backward's [K, vocab chunk] blocks hold as many elements as the forward's [chunk, V] ones
        ctx.vocab_chunk = max(1, chunk_size * weight.shape[0] // max(1, hidden.shape[0]))
        ctx.mark_non_differentiable(sum_squares)
        return out, sum_squares

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_squares):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        g_out = grad_out.to(lse.dtype)
        for start in range(0, weight.shape[0], ctx.vocab_chunk):
            w = weight[start:start + ctx.vocab_chunk]
            # d out / d logits = onehot(target) - softmax, times the incoming gradient
            g = torch.exp((hidden @ w.T).to(lse.dtype) - lse[:, None]).mul_(-g_out[:, None])
            # + incoming gradient at the target, for the positions whose target is in this block (no
            # data-dependent indexing, so no device sync per block)
            in_block = (targets >= start) & (targets < start + w.shape[0])
            g.scatter_add_(1, (targets - start).clamp(0, w.shape[0] - 1)[:, None],
                           torch.where(in_block, g_out, 0.0)[:, None])
            g = g.to(hidden.dtype)
            if want_weight:
                grad_weight[start:start + w.shape[0]] = g.T @ hidden
            if want_hidden:
                grad_hidden += (g @ w).to(lse.dtype)
        return (grad_hidden.to(hidden.dtype) if want_hidden else None), grad_weight, None, None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """log softmax(logits)[target] at every position [N, T] (fp32, or fp64 for fp64 logits)."""
    return _ChunkedTokenLogps.apply(logits, targets, chunk_size)[0]


def _scored_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """[N, T]: the positions whose next token is a completion token."""
    return torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], dim=1)


def ld_token_weights(loss_mask: torch.Tensor, alpha: float, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LD-DPO's per-token weights [N, T] of a pair batch (sequence i chosen, i + B rejected of pair i): 1 on the
    first L completion tokens of each sequence, `alpha` on the rest, L = the shorter completion of its pair;
    0 off completions. Weighted sums are then shared + alpha x tail."""
    mask = loss_mask.long()
    if sequence_ids is None:  # right-padded: one sequence per row
        rank, lengths = mask.cumsum(1), mask.sum(1)
        seq = torch.arange(mask.shape[0])[:, None].expand_as(mask)
    else:  # packed: the completion rank restarts with each sequence
        seq, flat = sequence_ids.reshape(-1), mask.reshape(-1)
        lengths = torch.zeros(int(seq.max()) + 1, dtype=torch.long).index_add_(0, seq, flat)
        rank = (flat.cumsum(0) - (lengths.cumsum(0) - lengths)[seq]).reshape(mask.shape)
        seq = seq.reshape(mask.shape)
    pairs = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:pairs], lengths[pairs:]).repeat(2)
    # float64: alpha as given, for fp64 scoring too
    return torch.full(mask.shape, alpha, dtype=torch.float64).masked_fill_(rank <= shared[seq], 1.0) * mask


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the scored positions (`head_sequence_logps`'s `scored`); computed from the CPU batch, it
    spares the device a data-dependent `nonzero` and its sync in every micro-step."""
    return _scored_mask(loss_mask).reshape(-1).nonzero().squeeze(-1)


@dataclass
class Scoring:
    """What every position [N, T] of a batch scores: the logits at a position predict `targets` there, the
    position counts when `mask` is set, and its log-prob adds to sequence `segments` (of `num_sequences`).

    `scoring_of` derives it from a collated batch; a sequence-parallel shard carries the slice of its whole
    batch's Scoring (dpo_ds.sequence_parallel), since its last position predicts the next shard's first token."""
    targets: torch.Tensor
    mask: torch.Tensor
    segments: torch.Tensor
    num_sequences: int
    weights: torch.Tensor | None = None  # each scored log-prob's weight in its sum (LD-DPO's ld_token_weights), else 1
    wpo: bool = False  # also sum WPO's per-token term log p(target) - log sum_v p_v^2 per sequence (unweighted, no gradient)

    def positions(self) -> torch.Tensor:
        """Flat indices of the scored positions (`scored_positions` of this Scoring)."""
        return self.mask.reshape(-1).nonzero().squeeze(-1)


def scoring_of(input_ids: torch.Tensor, loss_mask: torch.Tensor, sequence_ids: torch.Tensor | None = None,
               num_sequences: int | None = None, token_weights: torch.Tensor | None = None, wpo: bool = False) -> Scoring:
    """The Scoring of a collated batch: the logits at position t predict input_ids[:, t + 1]; the position is
    scored when that token is a completion token, and the score belongs to the sequence of the token it
    predicts. Right-padded (no `sequence_ids`): one sequence per row. `token_weights` [N, T] (aligned with
    loss_mask, e.g. ld_token_weights): the sums weight each completion token's log-prob by it. `wpo`: see
    Scoring.wpo."""
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    mask = _scored_mask(loss_mask)
    weights = None if token_weights is None else _scored_mask(token_weights)
    if sequence_ids is None:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return Scoring(next_ids, mask, rows[:, None].expand_as(input_ids), input_ids.shape[0], weights, wpo)
    segments = torch.cat([sequence_ids[:, 1:], sequence_ids[:, -1:]], dim=1)
    return Scoring(next_ids, mask, segments, num_sequences, weights, wpo)


def _counts(scoring: Scoring) -> torch.Tensor:
    return torch.zeros(scoring.num_sequences, device=scoring.mask.device).index_add_(
        0, scoring.segments.reshape(-1), scoring.mask.reshape(-1).float())


def _wpo_sums(token_logps: torch.Tensor, sum_squares: torch.Tensor, segments: torch.Tensor,
              num_sequences: int) -> torch.Tensor:
    """Per sequence: sum of log p(target) - log sum_v p_v^2 over its scored tokens (flat inputs), detached."""
    terms = (token_logps - sum_squares).detach()
    return terms.new_zeros(num_sequences).index_add(0, segments, terms)


def score_logits(logits: torch.Tensor, scoring: Scoring, chunk_size: int = 256) -> tuple[torch.Tensor, ...]:
    """(sum of scored token log-probs, scored-token counts) per sequence, from logits [N, T, V]; with
    `scoring.wpo`, a third: the per-sequence WPO sums (Scoring.wpo)."""
    # Score every position (the last against a dummy, never counted) so the logits are used whole: a slice
    # would make autograd build a full-size zero gradient for them. `where`, not multiply: a NaN/Inf at a
    # padding position must not reach the sum (0 * NaN = NaN).
    tokens, sum_squares = _ChunkedTokenLogps.apply(logits, scoring.targets, chunk_size, scoring.wpo)
    scored = torch.where(scoring.mask, tokens, 0.0)
    wpo = ((_wpo_sums(scored.reshape(-1), torch.where(scoring.mask, sum_squares, 0.0).reshape(-1),
                      scoring.segments.reshape(-1), scoring.num_sequences),) if scoring.wpo else ())
    if scoring.weights is not None:
        scored = scored * scoring.weights.to(scored.dtype)
    sums = scored.new_zeros(scoring.num_sequences).index_add(0, scoring.segments.reshape(-1), scored.reshape(-1))
    return sums, _counts(scoring), *wpo


def score_hidden(hidden: torch.Tensor, weight: torch.Tensor, scoring: Scoring, chunk_size: int = 256,
                 scored: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """As `score_logits`, from the last hidden states [N, T, d] and the output projection's weight [V, d]
    (logits = hidden @ weight.T), projecting only the scored positions (`scoring.positions()`, computed here
    when `scored` is not given). WPO's sums of squares come from the same logits blocks: no [tokens, vocab]
    tensor either."""
    if scored is None:
        scored = scoring.positions()
    segments = scoring.segments.reshape(-1)[scored]
    tokens, sum_squares = _HeadTokenLogps.apply(hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored), weight,
                                                scoring.targets.reshape(-1)[scored], chunk_size, scoring.wpo)
    wpo = (_wpo_sums(tokens, sum_squares, segments, scoring.num_sequences),) if scoring.wpo else ()
    if scoring.weights is not None:
        tokens = tokens * scoring.weights.reshape(-1)[scored].to(tokens.dtype)
    sums = tokens.new_zeros(scoring.num_sequences).index_add(0, segments, tokens)
    return sums, _counts(scoring), *wpo


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 256,
                   sequence_ids: torch.Tensor | None = None, num_sequences: int | None = None,
                   token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, completion-token counts) per sequence.

    logits [N, T, V] at position t predict input_ids[:, t + 1]; loss_mask [N, T] marks completion tokens.
    Right-padded batches: one sequence per row, results [N]. Packed batches (`sequence_ids` [N, T] gives each
    position's sequence): results [num_sequences]. `token_weights`: as scoring_of's.
    """
    return score_logits(logits, scoring_of(input_ids, loss_mask, sequence_ids, num_sequences, token_weights),
                        chunk_size)


def head_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                        chunk_size: int = 256, sequence_ids: torch.Tensor | None = None,
                        num_sequences: int | None = None, scored: torch.Tensor | None = None,
                        token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `sequence_logps`, from the last hidden states [N, T, d] and the output projection's weight [V, d]
    (logits = hidden @ weight.T), projecting only the scored positions (`scored_positions(loss_mask)`, computed
    here when not given)."""
    if scored is None:
        scored = scored_positions(loss_mask)
    return score_hidden(hidden, weight, scoring_of(input_ids, loss_mask, sequence_ids, num_sequences, token_weights),
                        chunk_size, scored)
