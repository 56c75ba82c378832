"""The training loop as short explicit functions (after DETR's engine.py)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from cbn_detect.data.build import start_epoch
from cbn_detect.engine.checkpoint import TrainState
from cbn_detect.engine.diagnostics import GradientMonitor, first_names, nonfinite_gradients
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.loss_stats import loss_variance
from cbn_detect.engine.signals import SignalWatch
from cbn_detect.norm import norm_diagnostics
from cbn_detect.norm.rollback import NormRollback
from cbn_detect.runtime import synchronize
from cbn_detect.runtime.phases import phase
from cbn_detect.runtime.progress import Progress, ProgressSettings, format_duration
from cbn_detect.tracking import MetricSink

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps; a checkpoint of the last good weights was saved."""


@dataclass
class LoopSettings:
    """``progress``: how the run shows its progress (``True``: a bar, ``False``: nothing).
    ``slow_warning_h``: warn once, after the first steps, when the training left will take longer
    than this many hours (None: never)."""

    epochs: int
    max_grad_norm: float | None
    log_every: int
    progress: ProgressSettings | bool
    max_nonfinite: int = 20
    loss_window: int = 100
    diagnostics: str = "basic"
    diagnostics_every: int = 50
    slow_warning_h: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.progress, bool):
            self.progress = ProgressSettings(mode="bar" if self.progress else "off")


@dataclass
class Loop:
    """What every training step uses, assembled once by the composition root."""

    model: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    settings: LoopSettings
    sinks: Sequence[MetricSink]
    checkpoint: Callable[[], None]
    precision: Precision

    @property
    def net(self) -> nn.Module:
        """The model without DDP's wrapper: diagnostics name layers as a single process does."""
        return getattr(self.model, "module", self.model)


def to_device(
    images: Sequence[torch.Tensor], targets: Sequence[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def _log(sinks: Sequence[MetricSink], record: dict[str, Any], step: int) -> None:
    with phase("logging"):
        for sink in sinks:
            sink.log(record, step)


def _log_histograms(sinks: Sequence[MetricSink], monitor: GradientMonitor, step: int) -> None:
    """Weight and gradient histograms (diagnostics level ``full``) to the sinks that draw them (W&B).
    Gathering them is diagnostics; handing them over, logging."""
    for sink in sinks:
        if hasattr(sink, "log_histograms"):
            histograms = monitor.histograms()
            with phase("logging"):
                sink.log_histograms(histograms, step)


def _next_batch(
    batches: Iterator[tuple[Sequence[torch.Tensor], Sequence[dict[str, Any]]]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]] | None:
    """The loader's next batch on ``device`` (None at the epoch's end): the time the step waits for data."""
    with phase("data"):
        batch = next(batches, None)
        return None if batch is None else to_device(*batch, device)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class StepAgreement:
    """What every process acts on after a step's forward, identical on all of them: the loss and its
    terms averaged over the processes (the global batch's), how many processes had a non-finite
    loss, and the signal all of them checkpoint on at the end of the step (None: none)."""

    loss: float
    terms: dict[str, float]
    nonfinite: int
    signum: int | None


def agree_on_step(loss: torch.Tensor, loss_terms: dict[str, torch.Tensor], watch: SignalWatch) -> StepAgreement:
    """The step's one all-reduce (a sum of 2 + terms + 3 float64 values) and its one device sync.

    Every process then skips the step, or goes into backward, together: a process alone with a
    non-finite loss that skipped backward would leave the others waiting in DDP's gradient
    all-reduce. A signal received by any process rides along, so all of them checkpoint at the same
    step. The terms are those of the model's loss dict, in its (every process's) order.
    """
    world = _world_size()
    values = torch.stack([loss.detach(), *(t.detach() for t in loss_terms.values())]).double()
    nonfinite = (~torch.isfinite(values[:1])).double()
    signals = torch.tensor(watch.flags(), dtype=torch.float64, device=values.device)
    vector = torch.cat([values, nonfinite, signals])
    if world > 1:
        dist.all_reduce(vector)
    summed = vector.tolist()
    k = len(loss_terms)
    means = [v / world for v in summed[: k + 1]]
    signum = watch.agreed(summed[k + 2 :])
    return StepAgreement(means[0], dict(zip(loss_terms, means[1:])), round(summed[k + 1]), signum)


def _skip_nonfinite(
    model: nn.Module, agreed: StepAgreement, state: TrainState,
    settings: LoopSettings, sinks: Sequence[MetricSink], checkpoint: Callable[[], None],
) -> None:
    """Count and report a step whose loss or gradients are not finite; stop a run that keeps failing.
    Every process takes the same decisions here: the counts come from the step's agreement."""
    state.nonfinite_total += 1
    state.nonfinite_consecutive += 1
    if agreed.nonfinite:
        what = "loss terms " + first_names([k for k, v in agreed.terms.items() if not math.isfinite(v)])
        world = _world_size()
        if world > 1:
            what += f" (on {agreed.nonfinite} of {world} processes)"
    else:
        what = "gradients of " + first_names(nonfinite_gradients(model))
    log.warning(
        "step %d: non-finite %s; optimizer step skipped, norm statistics restored (%d in a row, %d in total)",
        state.step + 1, what, state.nonfinite_consecutive, state.nonfinite_total,
    )
    _log(sinks, {"nonfinite_total": state.nonfinite_total}, state.step + 1)
    if state.nonfinite_consecutive >= settings.max_nonfinite:
        checkpoint()
        raise TrainingDiverged(
            f"training diverged: {state.nonfinite_consecutive} consecutive steps with a non-finite loss or "
            f"gradient (last: {what}) at step {state.step + 1}. The weights before the first skipped step "
            "are checkpointed. Try a lower optim.lr, a longer optim.warmup.iters, train.max_grad_norm, or a batch-independent "
            "norm (gn) at this batch size."
        )


def _checkpoint_and_hand_on(loop: Loop, state: TrainState, watch: SignalWatch, signum: int) -> None:
    """Every process checkpoints this step; none stops before all have written (the launcher
    tears the others down as soon as one exits), then each hands the agreed signal on."""
    loop.checkpoint()
    follower = _world_size() > 1 and dist.get_rank() != 0
    if _world_size() > 1:
        dist.barrier()
    watch.hand_on(state.step, signum, follower=follower)


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
            f"{self.name}: " if self.name else "", progress.seconds_per_item(),
            f" ({rate:.3g} img/s)" if math.isfinite(rate) else "", progress.total - progress.done,
            format_duration(left_s), self.limit_h,
            "A GPU (device=cuda), fewer train.epochs or a smaller model" if self.device == "cpu"
            else "Fewer train.epochs or a smaller model",
        )


def train_one_epoch(
    loop: Loop, state: TrainState, watch: SignalWatch, monitor: GradientMonitor, rollback: NormRollback,
    progress: Progress | None = None, slow: SlowRunCheck | None = None,
) -> None:
    """One pass over the loader (or what is left of it after a mid-epoch resume).

    Every step agrees across the processes (one small all-reduce, one device sync) that the loss is
    finite before anyone goes into backward, and checks that the gradient norm is finite (the same
    on every process after DDP's all-reduce) before the optimizer moves. A skipped step leaves the
    norms' running statistics and CBN's history as they were before it (``rollback``). The step's
    phases are marked for ``python -m cbn_detect.bench profile`` (``runtime.phases``: free otherwise).
    """
    model, optimizer, settings, sinks, precision = loop.model, loop.optimizer, loop.settings, loop.sinks, loop.precision
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    clip = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
    window_start, window_images = time.perf_counter(), 0
    last = window_start
    world = _world_size()
    batches = iter(loop.loader)
    while (batch := _next_batch(batches, loop.device)) is not None:
        images, targets = batch
        with phase("optimizer"):
            optimizer.zero_grad(set_to_none=True)  # the last step's gradients are read by nothing now
        with phase("rollback"):
            rollback.save()
        with phase("forward"), precision.autocast():
            loss_terms = model(images, targets)  # the model's loss method times itself as "loss"
        with phase("loss"):
            loss_terms = {k: v.float() for k, v in loss_terms.items()}
            loss = sum(loss_terms.values())
        with phase("sync"):
            agreed = agree_on_step(loss, loss_terms, watch)
        diagnose = settings.diagnostics != "off" and (state.step + 1) % settings.diagnostics_every == 0
        loss_finite = agreed.nonfinite == 0
        grad_norm = torch.tensor(math.nan)
        if loss_finite:
            with phase("backward"):
                precision.backward(loss)
            with phase("optimizer"):
                precision.unscale(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if loss_finite and bool(torch.isfinite(grad_norm)):
            diag: dict[str, Any] = {}
            if diagnose:
                with phase("diagnostics"):
                    monitor.missing_gradients()
                    diag.update(monitor.gradient_stats())
                    monitor.snapshot()
                    if settings.diagnostics == "full":
                        _log_histograms(sinks, monitor, state.step + 1)
            with phase("optimizer"):
                precision.step(optimizer)
            state.nonfinite_consecutive = 0
            if diagnose:
                with phase("diagnostics"):
                    diag.update(monitor.update_stats())
                    diag.update(norm_diagnostics(loop.net))
                _log(sinks, diag, state.step + 1)
            state.epoch_losses.append(agreed.loss)
            state.recent_losses = (state.recent_losses + [agreed.loss])[-settings.loss_window :]
        else:
            rollback.restore()
            if loss_finite:  # gradients overflowed: lower an fp16 loss scale (no backward ran otherwise)
                precision.skip()
            _skip_nonfinite(loop.net, agreed, state, settings, sinks, loop.checkpoint)
        with phase("optimizer"):
            loop.scheduler.step()
        state.step += 1
        state.epoch_step += 1
        now = time.perf_counter()
        state.train_time_s += now - last  # the agreement above already synchronised
        last = now
        window_images += len(images)
        if progress is not None:
            with phase("logging"):
                epoch = f"{state.epoch + 1}/{settings.epochs}"
                progress.update(1, images=len(images) * world, epoch=epoch, loss=agreed.loss)
                if slow is not None:
                    slow.check(progress)
        if state.step % settings.log_every == 0:
            with phase("logging"):
                synchronize(loop.device)
                elapsed = time.perf_counter() - window_start
                record = {
                    "epoch": state.epoch + 1,
                    "loss": agreed.loss,
                    "step_loss": agreed.loss,
                    **{f"loss/{k}": v for k, v in agreed.terms.items()},
                    "loss_variance_window": loss_variance(state.recent_losses),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm.item(),
                    "images_per_s": window_images / max(elapsed, 1e-9),
                }
                _log(sinks, record, state.step)
            window_start, window_images = time.perf_counter(), 0
        else:  # every step's loss, for the loss curve; a resume cuts metrics.jsonl back to its step
            _log(sinks, {"step_loss": agreed.loss}, state.step)
        if agreed.signum is not None:
            _checkpoint_and_hand_on(loop, state, watch, agreed.signum)


def fit(loop: Loop, state: TrainState, end_of_epoch: Callable[[TrainState], None]) -> TrainState:
    """Train from ``state`` to ``settings.epochs``; checkpoint each epoch and on SIGTERM/SIGUSR1/2
    (received by any process: all of them checkpoint at the same step). Progress goes to one bar
    or a line every few seconds for the whole run (``settings.progress``); a run that will take
    longer than ``settings.slow_warning_h`` says so after its first steps."""
    monitor = GradientMonitor(loop.net)
    rollback = NormRollback(loop.net)
    settings = loop.settings
    start_epoch(loop.loader, state.epoch, state.epoch_step)
    per_epoch = state.epoch_step + len(loop.loader)  # a resumed epoch's loader skips the steps done
    total = per_epoch * settings.epochs
    if state.step < total:
        resumed = f", resuming after step {state.step}" if state.step else ""
        log.info("training %d steps (%d epochs of %d)%s", total, settings.epochs, per_epoch, resumed)
    slow = SlowRunCheck(settings.slow_warning_h, loop.device.type, settings.progress.name)
    with SignalWatch() as watch, settings.progress.track("train", total, unit="step", initial=state.step) as progress:
        while state.epoch < settings.epochs:
            start_epoch(loop.loader, state.epoch, state.epoch_step)
            if state.epoch_step == 0:
                state.epoch_losses = []
            start = time.perf_counter()
            train_one_epoch(loop, state, watch, monitor, rollback, progress, slow)
            state.epoch += 1
            state.epoch_step = 0
            log.info(
                "epoch %d/%d done: mean loss %.4f, %.1f s",
                state.epoch, loop.settings.epochs, float(np.mean(state.epoch_losses)) if state.epoch_losses else math.nan,
                time.perf_counter() - start,
            )
            end_of_epoch(state)
        # A signal that came after the last step's agreement (during its backward or the last
        # checkpoint) is acted on now, by every process alike; the weights are checkpointed.
        world = _world_size()
        flags = torch.tensor(watch.flags(), dtype=torch.float64, device=loop.device)
        if world > 1:
            dist.all_reduce(flags)
        signum = watch.agreed(flags.tolist())
        if signum is not None:
            _checkpoint_and_hand_on(loop, state, watch, signum)
    return state
