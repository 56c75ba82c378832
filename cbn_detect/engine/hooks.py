"""What a run does around its training steps, one hook each (after detectron2's ``HookBase``).

:func:`cbn_detect.engine.trainer.train_step` only trains; progress, metrics, diagnostics, the job
lock, checkpoints and evaluation are hooks here, which the composition root (``cbn_detect.train``)
lists in the order they run. A hook overrides the events it needs of :class:`HookBase`; the
trainer calls it there, when it is due (:meth:`HookBase.due_at_step`,
:meth:`HookBase.due_after_epoch`), and times the call under the hook's ``phase`` (the names of
``python -m cbn_detect.bench profile``), so no hook times itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbn_detect.engine.checkpoint import TrainState
from cbn_detect.engine.diagnostics import GradientMonitor
from cbn_detect.engine.loss_stats import loss_variance
from cbn_detect.norm import norm_diagnostics
from cbn_detect.runtime import synchronize
from cbn_detect.runtime.lock import JobLock
from cbn_detect.runtime.progress import Progress, ProgressSettings, format_duration
from cbn_detect.tracking import MetricSink

log = logging.getLogger(__name__)

Scores = dict[str, Any]
"""An evaluation's scores, as ``evaluation.evaluator.evaluate`` returns them."""


@dataclass(frozen=True)
class StepResult:
    """What one training step leaves for the hooks: the loss and its terms (averaged over the
    processes), the gradient norm (NaN when no backward ran), whether the step was skipped as
    non-finite, this process's images, and the signal every process checkpoints on after the step
    (None: none)."""

    loss: float
    terms: dict[str, float]
    grad_norm: torch.Tensor
    skipped: bool
    images: int
    signum: int | None


class HookBase:
    """A hook of the training loop; every event does nothing unless overridden.

    ``before_train`` gets the number of training steps of the whole run (those done before a
    resume included). ``after_backward`` comes between backward (gradients clipped and finite) and
    the optimizer's step, only for a step the optimizer takes. ``after_step`` comes once the step,
    skipped or not, is counted in ``state.step``. ``after_train`` comes however training ends.
    """

    phase: str = "logging"
    """The profile phase the trainer times this hook's calls under."""

    def due_at_step(self, step: int) -> bool:
        """Whether ``before_step``, ``after_backward`` and ``after_step`` run at training step
        ``step`` (counted from 1)."""
        return True

    def due_after_epoch(self, epoch: int) -> bool:
        """Whether ``after_epoch`` runs once ``epoch`` epochs (counted from 1) are done."""
        return True

    def before_train(self, state: TrainState, total_steps: int) -> None:
        pass

    def before_epoch(self, state: TrainState) -> None:
        pass

    def before_step(self, state: TrainState) -> None:
        pass

    def after_backward(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState, result: StepResult) -> None:
        pass

    def after_epoch(self, state: TrainState) -> None:
        pass

    def after_train(self, state: TrainState) -> None:
        pass


SLOW_CHECK_STEPS = 5
SLOW_CHECK_S = 30.0
"""The slow-run estimate is made once, after the first step and then this many more steps or this
many seconds of them, whichever comes first (at 49 s a step: after the second step)."""


@dataclass
class SlowRunCheck:
    """One warning, early in a run, when the training left will take longer than ``limit_h`` hours:
    a run on the wrong device, or far too big for it, says so before hours go by."""

    limit_h: float | None
    device: str = ""
    name: str = ""
    decided: bool = False

    def check(self, progress: Progress) -> None:
        if self.decided or not self.limit_h:
            return
        if progress.measured_items < SLOW_CHECK_STEPS and progress.measured_s < SLOW_CHECK_S:
            return
        self.decided = True
        left_s = progress.remaining_s()
        if not left_s > self.limit_h * 3600:
            return
        rate = progress.images_per_s()
        log.warning(
            "%sthis run is slow: at %.3g s a step%s, the %d training steps left take about %s, more than "
            "train.slow_warning_h=%g (evaluation comes on top). %s shorten it; train.slow_warning_h=null "
            "silences this.",
            f"{self.name}: " if self.name else "",
            progress.seconds_per_item(),
            f" ({rate:.3g} img/s)" if math.isfinite(rate) else "",
            progress.total - progress.done,
            format_duration(left_s),
            self.limit_h,
            "A GPU (device=cuda), fewer train.epochs or a smaller model"
            if self.device == "cpu"
            else "Fewer train.epochs or a smaller model",
        )


class ProgressHook(HookBase):
    """The run's progress, one bar or a line every few seconds for the whole run (``settings``),
    and the slow-run warning after its first steps (``slow``). The rate counts the images of all
    ``world`` processes."""

    def __init__(self, settings: ProgressSettings, epochs: int, world: int, slow: SlowRunCheck) -> None:
        self.settings, self.epochs, self.world, self.slow = settings, epochs, world, slow
        self.progress: Progress | None = None

    def before_train(self, state: TrainState, total_steps: int) -> None:
        self.progress = self.settings.track("train", total_steps, unit="step", initial=state.step)

    def after_step(self, state: TrainState, result: StepResult) -> None:
        assert self.progress is not None
        epoch = f"{state.epoch + 1}/{self.epochs}"
        self.progress.update(1, images=result.images * self.world, epoch=epoch, loss=result.loss)
        self.slow.check(self.progress)

    def after_train(self, state: TrainState) -> None:
        if self.progress is not None:
            self.progress.close()


class MetricsWriter(HookBase):
    """Every ``every`` steps the full record (losses, loss variance over the window, lr, gradient
    norm, images per second since the last full record or the epoch's start); at the other steps
    the step's loss alone (``step_loss``), for complete loss curves. A resume cuts
    ``metrics.jsonl`` back to its step, so no step appears twice."""

    def __init__(
        self, sinks: Sequence[MetricSink], every: int, device: torch.device, optimizer: torch.optim.Optimizer
    ) -> None:
        self.sinks, self.every, self.device, self.optimizer = sinks, every, device, optimizer
        self._window_start, self._window_images = time.perf_counter(), 0

    def before_epoch(self, state: TrainState) -> None:
        self._window_start, self._window_images = time.perf_counter(), 0

    def after_step(self, state: TrainState, result: StepResult) -> None:
        self._window_images += result.images
        if state.step % self.every:
            log_to(self.sinks, {"step_loss": result.loss}, state.step)
            return
        synchronize(self.device)
        elapsed = time.perf_counter() - self._window_start
        record = {
            "epoch": state.epoch + 1,
            "loss": result.loss,
            "step_loss": result.loss,
            **{f"loss/{k}": v for k, v in result.terms.items()},
            "loss_variance_window": loss_variance(state.recent_losses),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm.item(),
            "images_per_s": self._window_images / max(elapsed, 1e-9),
        }
        log_to(self.sinks, record, state.step)
        self._window_start, self._window_images = time.perf_counter(), 0


class DiagnosticsHook(HookBase):
    """Every ``every`` steps the optimizer takes, one record: gradient norm and mean per module
    group (after clipping: what the optimizer sees), the update ratio ||delta w|| / ||w||, the
    parameters the step left unchanged, the norms' own statistics; a warning, once, about
    parameters that get no gradient. At level ``full`` also weight and gradient histograms, before
    the update, for the sinks that draw them."""

    phase = "diagnostics"

    def __init__(self, net: nn.Module, sinks: Sequence[MetricSink], level: str, every: int) -> None:
        self.net, self.sinks, self.level, self.every = net, sinks, level, every
        self.monitor = GradientMonitor(net)
        self._record: dict[str, float] = {}

    def due_at_step(self, step: int) -> bool:
        return step % self.every == 0

    def after_backward(self, state: TrainState) -> None:
        self.monitor.missing_gradients()
        self._record = self.monitor.gradient_stats()
        self.monitor.snapshot()
        if self.level == "full" and any(sink.draws for sink in self.sinks):
            histograms = self.monitor.histograms()
            for sink in self.sinks:
                sink.log_histograms(histograms, state.step + 1)

    def after_step(self, state: TrainState, result: StepResult) -> None:
        if result.skipped:
            return
        self._record.update(self.monitor.update_stats())
        self._record.update(norm_diagnostics(self.net))
        log_to(self.sinks, self._record, state.step)


class JobLockRefresh(HookBase):
    """Shows the job's lock alive while training goes on (at most every ``REFRESH_EVERY_S``), so
    that no other sweep takes the job over as stale. Raises ``JobLocked`` if one did anyway: two
    writers must never go on. The run releases the lock when it ends, however it ends."""

    def __init__(self, lock: JobLock) -> None:
        self.lock = lock

    def after_step(self, state: TrainState, result: StepResult) -> None:
        self.lock.refresh_if_due()

    def after_epoch(self, state: TrainState) -> None:
        self.lock.refresh_if_due()


class EpochCheckpoint(HookBase):
    """The run's checkpoint at the end of every epoch (``checkpoint``: the run's own writer)."""

    phase = "checkpoint"

    def __init__(self, checkpoint: Callable[[], None]) -> None:
        self.checkpoint = checkpoint

    def after_epoch(self, state: TrainState) -> None:
        self.checkpoint()


class PeriodicEvaluation(HookBase):
    """Scores of the current weights every ``every`` epochs, before the last one (the run's final
    evaluation follows it). ``scores``: the last evaluation's, None on a process that gets none."""

    phase = "evaluation"

    def __init__(self, evaluate: Callable[[], Scores | None], every: int, epochs: int) -> None:
        self.evaluate, self.every, self.epochs = evaluate, every, epochs
        self.scores: Scores | None = None

    def due_after_epoch(self, epoch: int) -> bool:
        return epoch % self.every == 0 and epoch < self.epochs

    def after_epoch(self, state: TrainState) -> None:
        self.scores = self.evaluate()


class EvaluationWriter(HookBase):
    """The scores of ``evaluation`` into the sinks after each evaluation, then its ``pictures``
    (test images with their detections, for the sinks that draw them)."""

    def __init__(
        self, evaluation: PeriodicEvaluation, sinks: Sequence[MetricSink], pictures: Callable[[], None]
    ) -> None:
        self.evaluation, self.sinks, self.pictures = evaluation, sinks, pictures

    def due_after_epoch(self, epoch: int) -> bool:
        return self.evaluation.due_after_epoch(epoch)

    def after_epoch(self, state: TrainState) -> None:
        scores = self.evaluation.scores
        log_eval(self.sinks, state, scores)
        if scores is not None:
            self.pictures()


def log_to(sinks: Sequence[MetricSink], record: dict[str, Any], step: int) -> None:
    for sink in sinks:
        sink.log(record, step)


def log_eval(sinks: Sequence[MetricSink], state: TrainState, scores: Scores | None) -> None:
    """An evaluation's mAPs and COCO APs as one record at the current step (nothing without scores)."""
    if scores is None:
        return
    record = {"epoch": state.epoch, **{f"eval/{k}": v for k, v in scores.items() if k.startswith("map_")}}
    record.update({f"eval/coco_{k}": v for k, v in scores.get("coco", {}).items()})
    log_to(sinks, record, state.step)
