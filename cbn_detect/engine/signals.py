"""Checkpoint-on-signal: before SLURM kills a job it sends SIGTERM, or the signal the job asked for
(``--signal``: submitit asks for SIGUSR2, other setups use SIGUSR1). Saving inside a signal
handler could capture a half-updated model, so the handler only records the signal; the training
loop checkpoints at the next step boundary and then hands the signal on to whoever handled it
before (submitit's handler requeues the job), or stops the run.

With several processes, the signal may reach only one of them (or each at a different step). Each
process's :meth:`SignalWatch.flags` ride in the step's all-reduce; :meth:`SignalWatch.agreed` turns
the summed flags into the one signal every process acts on at the end of that same step."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
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

    def flags(self) -> list[float]:
        """This process's part of a step's agreement: one count per signal of ``HANDLED``, 1 for the
        one received so far (if any). Summed over the processes, they go to :meth:`agreed`."""
        return [float(signum == self.received) for signum in HANDLED]

    @staticmethod
    def agreed(counts: Sequence[float]) -> int | None:
        """The signal every process acts on, from the summed :meth:`flags`: the first of ``HANDLED``
        that any process received (None if none did). The same numbers give the same signal on
        every process, so all of them hand on the same way."""
        return next((signum for signum, count in zip(HANDLED, counts) if count > 0), None)

    def hand_on(self, step: int, signum: int | None = None, follower: bool = False) -> None:
        """After the checkpoint, the handler that was there before decides: submitit's requeues
        the job on its signal and ignores SIGTERM (training goes on); without one, the run stops.

        ``signum``: the signal agreed by every process (:meth:`agreed`), which this process may not
        have received itself; by default the one it received. A different signal this process
        received is kept: the next step's agreement hands it on in turn. ``follower``: this is not
        the first process of several. submitit requeues from the first task only and returns on the
        others (so as not to kill the first one while it requeues): a follower whose handler
        returned from a requeue signal stops here, checkpointed, instead of training on alone."""
        signum = self.received if signum is None else signum
        assert signum is not None
        frame = self._frame if self.received == signum else None
        if self.received == signum:
            self.received = None
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
            if not (follower and signum != signal.SIGTERM):
                return
        raise TrainingInterrupted(signum, step)
