"""Calls whose name changed inside the tested library ranges, chosen by what the installed library has.

transformers 5.17 (the tested floor) has `gradient_checkpointing_enable` only; later 5.x releases add
`activation_checkpointing_enable` and keep the old name as a deprecated alias (removed in 6). Feature detection,
not version strings: a backport or a patched build picks the right call by itself.
"""
from __future__ import annotations

NON_REENTRANT = {"use_reentrant": False}


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder block's activations in the backward pass with torch's non-reentrant checkpoint
    (what ZeRO-3's parameter hooks need: the reentrant one re-runs the forward outside autograd)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(NON_REENTRANT))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(NON_REENTRANT))
