"""Checkpoint-on-signal: SLURM sends SIGUSR1 (submitit's requeue signal) or SIGTERM before it kills
a job. Saving inside a signal handler could capture a half-updated model, so the handler only
records the signal; the training loop checkpoints at the next step boundary and then hands the
signal on to whoever handled it before (submitit requeues the job), or stops the run."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):
    """Raised after the interrupt checkpoint was written; rerunning the same command resumes."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; a checkpoint was saved, "
            "rerun the same command to resume"
        )
        self.signum = signum


class SignalWatch:
    def __init__(self) -> None:
        self.received: int | None = None
        self._frame: FrameType | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
        self.received, self._frame = signum, frame

    def hand_on(self, step: int) -> None:
        """After the checkpoint: let the previous handler act (submitit requeues), else stop the run."""
        assert self.received is not None
        previous = self._previous.get(self.received)
        self.__exit__()
        if callable(previous):
            previous(self.received, self._frame)
        raise TrainingInterrupted(self.received, step)
