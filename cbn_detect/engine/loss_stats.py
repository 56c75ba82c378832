"""Statistics of a run's training losses (stored in ``results.json`` and logged per step)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def loss_variance(losses: Sequence[float]) -> float:
    """Population variance of per-iteration training losses: the last completed epoch's for
    ``loss_variance``, the last ``train.loss_window`` iterations' for ``loss_variance_window``.

    NaN when there are fewer than two iterations or a loss was non-finite: a number there would be
    the "0.0" that hid the original study's bugs.
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.size < 2 or not np.all(np.isfinite(values)):
        return math.nan
    return float(values.var())
