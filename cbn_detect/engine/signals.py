"""Checkpoint-on-signal: before SLURM kills a job it sends SIGTERM, or the signal the job asked for
(``--signal``: submitit asks for SIGUSR2, other setups use SIGUSR1). Saving inside a signal
handler could capture a half-updated model, so the handler only records the signal; the training
loop checkpoints at the next step boundary and then hands the signal on to whoever handled it
before (submitit's handler requeues the job), or stops the run."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


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
        """After the checkpoint, the handler that was there before decides: submitit's requeues
        the job on its signal and ignores SIGTERM (training goes on); without one, the run stops."""
        signum, previous = self.received, self._previous.get(self.received)
        assert signum is not None
        self.received = None
        if callable(previous):
            previous(signum, self._frame)
            return
        raise TrainingInterrupted(signum, step)
