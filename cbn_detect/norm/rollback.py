"""Undo what one training forward did to the norm layers, for a step that is found bad and skipped.

A training forward moves every batch-statistics norm's running statistics and ``num_batches_tracked``
(BN, SyncBN, BRN, whose ramp counts it, and CBN), and CBN also writes one history slot and advances
its counters. A step whose loss or gradients turn out non-finite is skipped by the trainer; without
this it would still have fed the bad batch into all of that, and a NaN in a running variance or a
history slot outlives the skipped step.

Per step, :meth:`NormRollback.save` copies, into storage allocated once, what the next forward will
change: every norm's running buffers (2C + 1 values per layer) and, for each CBN layer past its
burn-in, the one history slot its forward overwrites (mean and E[y^2]: 2C, the mean input patch:
Cin x kh x kw, and the E[y^2] derivative and the weight: 2 x the conv weight's size), plus CBN's three
integer counters. That is one ``_foreach_copy_`` call (a few kernel launches on a GPU) moving about
as much memory as CBN's own write of that slot, and no allocation. :meth:`restore`, on a skipped step
only, copies it all back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from cbn_detect.norm.cbn import CrossIterationBatchNorm2d


class NormRollback:
    """Call :meth:`save` right before each training forward and :meth:`restore` when that step is
    skipped: every norm's running statistics, ``num_batches_tracked`` and CBN's history and
    counters are then exactly as they were before it.

    The caller must guarantee one training forward between ``save`` and ``restore`` (CBN's saved
    slot is the one slot a forward writes), and build it on the finished model (after the norms
    are converted and swapped; the tensors themselves may move, they are looked up at each call).
    """

    def __init__(self, model: nn.Module) -> None:
        self._norms = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
        self._cbns = [m for m in self._norms if isinstance(m, CrossIterationBatchNorm2d)]
        self._storage: list[Tensor] = []
        self._layout: list[tuple[torch.dtype, torch.Size, torch.device]] = []
        self._buffers = 0
        self._cbn_state: list[tuple[tuple[int, int, int], tuple[str, ...]]] = []
        self._saved = False

    def _running_buffers(self) -> list[Tensor]:
        return [b for m in self._norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    @torch.no_grad()
    def save(self) -> None:
        """Before a training forward: copy what it will change."""
        sources = self._running_buffers()
        self._buffers = len(sources)
        self._cbn_state = []
        for layer in self._cbns:
            counters, slot = layer.step_state()
            self._cbn_state.append((counters, tuple(slot)))
            sources.extend(slot.values())
        layout = [(t.dtype, t.shape, t.device) for t in sources]
        if layout != self._layout:  # first call, CBN leaving burn-in, or tensors moved
            self._storage = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in sources]
            self._layout = layout
        if sources:
            torch._foreach_copy_(self._storage, sources)
        self._saved = True

    @torch.no_grad()
    def restore(self) -> None:
        """After the forward of a step that is skipped: put everything back as :meth:`save` found it."""
        if not self._saved:
            raise RuntimeError("NormRollback.restore() without a save() before the forward")
        targets = self._running_buffers()
        if len(targets) != self._buffers:
            raise RuntimeError("the model's norm layers changed between NormRollback.save() and restore()")
        if targets:
            torch._foreach_copy_(targets, self._storage[: self._buffers])
        start = self._buffers
        for layer, (counters, keys) in zip(self._cbns, self._cbn_state):
            layer.restore_step_state(counters, dict(zip(keys, self._storage[start : start + len(keys)])))
            start += len(keys)
        self._saved = False
