"""Attention over a packed row (`padding_free`) as one sdpa call per sequence.

transformers attends a packed row under sdpa through a block-diagonal causal mask over the whole row: a
[T, T] mask and T x T scores for a micro-batch of T tokens in all, so a row of 16 sequences of 128 tokens
costs 16 times the attention of its sequences alone, and the mask keeps sdpa off its fastest kernels. Here
each sequence is attended alone (sdpa's own causal path, no mask), which is what flash attention's varlen
kernel does on a GPU. Registered with transformers as KERNEL; the models of a padding_free run switch to it
after loading (`adopt`) where their attention is sdpa and no mask of theirs would be lost."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

KERNEL = "sdpa_packed"  # the attn_implementation name it is registered under


def attends_sequences_alone(kernel: str) -> bool:
    """Whether attention kernel `kernel` attends each sequence of a packed row alone, from their bounds (this
    module's, or flash attention's varlen kernels)."""
    return kernel == KERNEL or kernel.startswith("flash_attention")


def dropped_feature(text_config: Any, max_length: int) -> str | None:
    """What of `text_config`'s attention attending each sequence alone through sdpa would drop at `max_length`
    tokens, or None: a sliding window or attention chunk shorter than max_length (transformers applies them as a
    mask), or soft-capped attention logits (which transformers' sdpa does not apply; eager attention does)."""
    window, chunk = sliding_window_below(text_config, max_length), getattr(text_config, "attention_chunk_size", None)
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if window is not None:
        return f"sliding window ({window} tokens < max_length {max_length})"
    if chunk is not None:
        return f"attention chunks ({chunk} tokens)"
    return f"attention logit soft-capping ({softcap})" if softcap else None


def mask_reason(requested: str, kernel: str | None, text_config: Any, max_length: int) -> str | None:
    """Why a packed row of a model whose attention is `kernel` (`requested`: the run's attn_implementation) goes
    through transformers' block-diagonal mask instead of KERNEL, or None where KERNEL computes what the model's own
    attention would. Asked by `adopt` on the loaded model and by padding_free auto before it is loaded."""
    if requested != "auto":
        return f"attn_implementation {requested} was asked for"
    if kernel != "sdpa":
        return f"its attention is {kernel}"
    dropped = dropped_feature(text_config, max_length)
    return f"its {dropped} would be dropped" if dropped is not None else None


def sliding_window_below(text_config: Any, max_length: int) -> int | None:
    """The sliding window of `text_config`'s attention where a sequence of `max_length` tokens is longer than it
    (transformers then applies it as a mask, which a kernel called without one drops), else None."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None) or ()
    sliding = "sliding_attention" in layer_types if layer_types else True  # no layer types: every layer slides
    return window if window is not None and sliding and window < max_length else None


# The last few (tensor given to a model as a packed row's sequence marks, its bounds as host ints), newest last: every
# layer of a forward (and its recompute in the backward) is given the same tensor, so its bounds are known after the
# first. `note_bounds` enters them from the CPU batch, so that on a GPU no layer reads them back (a device sync).
_KNOWN: list[tuple[torch.Tensor, list[int]]] = []
_KEPT = 4  # a policy forward, the reference forward beside it, and their micro-batch's neighbours


def note_bounds(marks: torch.Tensor, bounds: list[int]) -> None:
    """`bounds` (host ints) are those of `marks`, a packed row's cu_seq_lens_q or position ids about to be given
    to a model."""
    _KNOWN.append((marks, bounds))
    del _KNOWN[:-_KEPT]


def _bounds_of(marks: torch.Tensor, read: Callable[[torch.Tensor], list[int]]) -> list[int]:
    for known, bounds in reversed(_KNOWN):
        if known is marks:
            return bounds
    bounds = read(marks)
    note_bounds(marks, bounds)
    return bounds


def _starts_of(position_ids: torch.Tensor) -> list[int]:
    """Where each sequence of a packed row starts and the row ends: a sequence starts where the position does not
    continue the previous one (as transformers' packing test)."""
    row = position_ids[0]
    return [*(torch.diff(row, prepend=row[:1] - 2) != 1).nonzero().squeeze(-1).tolist(), row.shape[0]]


def per_sequence(sdpa: Callable) -> Callable:
    """transformers' attention kernel `sdpa` applied to each sequence of a packed row alone, causal within it.

    The sequences come from `cu_seq_lens_q` where the caller gives it (dpo_ds.scoring, as for flash attention's
    varlen kernel), else from `position_ids`; read on the host once per tensor unless noted (`note_bounds`)."""
    def attend(module, query, key, value, attention_mask, *args, position_ids=None, cu_seq_lens_q=None, **kwargs):
        if query.shape[0] != 1 or (cu_seq_lens_q is None and position_ids is None):  # not a packed row
            return sdpa(module, query, key, value, attention_mask, *args, position_ids=position_ids, **kwargs)
        if cu_seq_lens_q is not None:
            bounds = _bounds_of(cu_seq_lens_q, lambda cu: cu.tolist())
        else:
            bounds = _bounds_of(position_ids, _starts_of)
        if len(bounds) == 2:
            return sdpa(module, query, key, value, None, *args, **kwargs)
        parts = [sdpa(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, *args, **kwargs)[0]
                 for a, b in zip(bounds, bounds[1:])]
        return torch.cat(parts, dim=1), None  # sdpa returns [rows, seq, heads, head size]
    return attend


def register() -> None:
    """Make KERNEL an attn_implementation transformers knows (once per process). It has no mask function of its
    own, so transformers builds no mask for it (its masking_utils: a kernel without one gets None)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if KERNEL not in AttentionInterface._global_mapping:
        AttentionInterface.register(KERNEL, per_sequence(sdpa_attention_forward))


def adopt(model: torch.nn.Module, cfg) -> bool:
    """Switch a freshly loaded model of a padding_free run to KERNEL where that computes what its own attention
    would: its kernel is sdpa as transformers chose it (`attn_implementation: auto`), one rank holds whole
    sequences (sequence parallelism wraps the kernel itself), and nothing of its attention would be dropped
    (`mask_reason`). Returns whether it switched; a packed run left with transformers' block-diagonal mask gets
    a warning saying why."""
    config = model.config
    kernel = config._attn_implementation
    if not cfg.padding_free or cfg.sequence_parallel_size > 1 or attends_sequences_alone(kernel):
        return False
    why = mask_reason(cfg.attn_implementation, kernel, config.get_text_config(), cfg.max_length)
    if why is not None:
        _warn_once(f"padding_free: {type(model).__name__} attends each packed row through transformers' "
                   f"block-diagonal mask, quadratic in the row's total tokens ({why})")
        return False
    register()
    model.set_attn_implementation(KERNEL)
    return config._attn_implementation == KERNEL


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:  # the policy and the reference engine would say it alike
    logger.warning("%s", message)
