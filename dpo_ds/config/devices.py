"""What the config needs to know of the device before DeepSpeed is imported."""
from __future__ import annotations

import os


def expected_accelerator() -> str:
    """The device DeepSpeed will run on, known before it is imported: DS_ACCELERATOR when set, else cuda where a
    CUDA device is visible, else cpu."""
    import torch

    return os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 on a CUDA device that supports it (and DeepSpeed is not forced onto the CPU), else fp32."""
    if precision != "auto":
        return precision
    import torch

    gpu = expected_accelerator() == "cuda" and torch.cuda.is_available()
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
