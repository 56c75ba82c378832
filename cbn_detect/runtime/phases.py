"""Where a run's time goes: named phases that a profiler adds up, and that cost nothing otherwise.

The trainer and the composition root mark their phases with ``with phase("forward"):``. Unless a
:class:`PhaseTimer` is installed (``python -m cbn_detect.bench profile`` installs one), ``phase``
returns one shared do-nothing context manager: no clock is read, no device is synchronised, no
object is allocated, so ordinary runs are not slowed down by being measurable.

Times are exclusive: a phase entered inside another one (the loss inside the model's forward, W&B's
set-up inside the run's setup) pauses its parent, so every second is counted once and the phases'
sum never exceeds the wall time. While a timer is installed the GPU is synchronised at every phase
edge, so a phase is charged with the kernels it queued rather than with their launch; that costs
some overlap of host and device work, which is why only a profiling run does it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
_active: PhaseTimer | None = None


def _synchronize_cuda() -> None:
    """Wait for the current CUDA device when this process has used CUDA (nothing to wait for on CPU).
    The current device, not a device passed in: the timer is installed before the run picks its own,
    and each process of a DDP job has set its device as current."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Exclusive wall-clock seconds and entry counts per phase name, for one process.

    Only the thread that runs the training enters phases (data-loader workers are processes whose
    time shows up as the main process waiting in the ``data`` phase)."""

    def __init__(self, synchronize: bool = True) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._synchronize = synchronize
        self._stack: list[str] = []
        self._since = 0.0  # when the innermost open phase last started or resumed

    def _now(self) -> float:
        if self._synchronize:
            _synchronize_cuda()
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Charge the time inside to ``name``, pausing the enclosing phase, if any, meanwhile."""
        now = self._now()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._stack.append(name)
        self._since = now
        try:
            yield
        finally:
            now = self._now()
            self.seconds[name] += now - self._since
            self.counts[name] += 1
            self._stack.pop()
            self._since = now

    def totals(self) -> dict[str, dict[str, float]]:
        """``{phase: {"seconds": s, "count": n}}`` for every phase entered at least once."""
        return {name: {"seconds": self.seconds[name], "count": self.counts[name]} for name in self.counts}


def phase(name: str) -> AbstractContextManager[None]:
    """``with phase("forward"): ...``: timed by the installed :class:`PhaseTimer`, else nothing at all."""
    timer = _active
    if timer is None:
        return _NOOP
    return timer.span(name)


def active_timer() -> PhaseTimer | None:
    """The installed timer (None in an ordinary run)."""
    return _active


@contextlib.contextmanager
def timing(timer: PhaseTimer) -> Iterator[PhaseTimer]:
    """Install ``timer`` for the phases entered inside (one at a time: profiles do not nest)."""
    global _active
    if _active is not None:
        raise RuntimeError("a PhaseTimer is already installed; profiles do not nest")
    _active = timer
    try:
        yield timer
    finally:
        _active = None


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is the phase ``name`` (for methods the trainer cannot
    wrap from outside, such as a detector's loss inside its training forward)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
