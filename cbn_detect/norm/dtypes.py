"""The one rule for the dtype in which batch-statistics norms accumulate their statistics."""

from __future__ import annotations

import torch


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for the statistics of an input of ``dtype``: at least fp32, never less than it.

    fp16/bf16 inputs (autocast, half models) get fp32: sums of squares over a detection batch
    overflow fp16 and lose most digits in bf16. fp64 inputs keep fp64: a hard-coded ``.float()``
    would silently downcast them, so a float64 run (gradcheck, precision studies) would not be one.
    """
    return torch.promote_types(dtype, torch.float32)
