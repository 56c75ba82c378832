"""The training loop (after detectron2's ``engine/train_loop.py``): :func:`train_step` trains one
iteration and nothing else, :func:`run_epoch` runs the steps of an epoch between the hooks due at
each (``engine.hooks``: progress, metrics, diagnostics, lock, checkpoints, evaluation), and
:func:`fit` the epochs of a run. :class:`Hooks` calls the hooks and is the one place their time is
measured for ``python -m cbn_detect.bench profile``."""

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
from cbn_detect.engine.diagnostics import first_names, nonfinite_gradients
from cbn_detect.engine.hooks import HookBase, StepResult, log_to
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.signals import SignalWatch
from cbn_detect.norm.rollback import NormRollback
from cbn_detect.runtime.phases import phase
from cbn_detect.runtime.progress import ProgressSettings
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
    model: nn.Module,
    agreed: StepAgreement,
    state: TrainState,
    settings: LoopSettings,
    sinks: Sequence[MetricSink],
    checkpoint: Callable[[], None],
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
        state.step + 1,
        what,
        state.nonfinite_consecutive,
        state.nonfinite_total,
    )
    with phase("logging"):
        log_to(sinks, {"nonfinite_total": state.nonfinite_total}, state.step + 1)
    if state.nonfinite_consecutive >= settings.max_nonfinite:
        with phase("checkpoint"):
            checkpoint()
        raise TrainingDiverged(
            f"training diverged: {state.nonfinite_consecutive} consecutive steps with a non-finite loss or "
            f"gradient (last: {what}) at step {state.step + 1}. The weights before the first skipped step "
            "are checkpointed. Try a lower optim.lr, a longer optim.warmup.iters, train.max_grad_norm, or a "
            "batch-independent norm (gn) at this batch size."
        )


def _checkpoint_and_hand_on(loop: Loop, state: TrainState, watch: SignalWatch, signum: int) -> None:
    """Every process checkpoints this step; none stops before all have written (the launcher
    tears the others down as soon as one exits), then each hands the agreed signal on."""
    with phase("checkpoint"):
        loop.checkpoint()
    follower = _world_size() > 1 and dist.get_rank() != 0
    if _world_size() > 1:
        dist.barrier()
    watch.hand_on(state.step, signum, follower=follower)


def _overrides(hook: HookBase, event: str) -> bool:
    return getattr(type(hook), event) is not getattr(HookBase, event)


class Hooks:
    """The run's hooks in their order, and the one place their calls are timed: each under the
    hook's phase (``runtime.phases``: free outside a profile). A hook is called only for the events
    it overrides and when it is due, so a profile's call counts say how often each one worked."""

    def __init__(self, hooks: Sequence[HookBase]) -> None:
        self.hooks = list(hooks)

    def due_at_step(self, step: int) -> Hooks:
        return Hooks([hook for hook in self.hooks if hook.due_at_step(step)])

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            if _overrides(hook, event):
                with phase(hook.phase):
                    getattr(hook, event)(*args)

    def before_train(self, state: TrainState, total_steps: int) -> None:
        self._call("before_train", state, total_steps)

    def before_epoch(self, state: TrainState) -> None:
        self._call("before_epoch", state)

    def before_step(self, state: TrainState) -> None:
        self._call("before_step", state)

    def after_backward(self, state: TrainState) -> None:
        self._call("after_backward", state)

    def after_step(self, state: TrainState, result: StepResult) -> None:
        self._call("after_step", state, result)

    def after_epoch(self, state: TrainState) -> None:
        due = Hooks([hook for hook in self.hooks if hook.due_after_epoch(state.epoch)])
        due._call("after_epoch", state)

    def after_train(self, state: TrainState) -> None:
        self._call("after_train", state)


def train_step(
    loop: Loop,
    state: TrainState,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    watch: SignalWatch,
    rollback: NormRollback,
    hooks: Hooks,
) -> StepResult:
    """One iteration: forward, the processes' agreement, backward, the optimizer's and the
    schedule's step.

    Every process agrees (one small all-reduce, one device sync) that the loss is finite before
    anyone goes into backward, and the gradient norm is checked finite (the same on every process
    after DDP's all-reduce) before the optimizer moves; otherwise every process skips the step,
    and ``rollback`` leaves the norms' running statistics and CBN's history as they were before
    it. ``hooks.after_backward`` runs between a taken step's backward and its update.
    """
    model, optimizer, precision, settings = loop.model, loop.optimizer, loop.precision, loop.settings
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
    loss_finite = agreed.nonfinite == 0
    grad_norm = torch.tensor(math.nan)
    if loss_finite:
        with phase("backward"):
            precision.backward(loss)
        with phase("optimizer"):
            precision.unscale(optimizer)
            params = [p for p in model.parameters() if p.requires_grad]
            clip = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    skipped = not (loss_finite and bool(torch.isfinite(grad_norm)))
    if skipped:
        rollback.restore()
        if loss_finite:  # gradients overflowed: lower an fp16 loss scale (no backward ran otherwise)
            precision.skip()
        _skip_nonfinite(loop.net, agreed, state, settings, loop.sinks, loop.checkpoint)
    else:
        hooks.after_backward(state)
        with phase("optimizer"):
            precision.step(optimizer)
        state.nonfinite_consecutive = 0
        state.epoch_losses.append(agreed.loss)
        state.recent_losses = (state.recent_losses + [agreed.loss])[-settings.loss_window :]
    with phase("optimizer"):
        loop.scheduler.step()
    state.step += 1
    state.epoch_step += 1
    return StepResult(agreed.loss, agreed.terms, grad_norm, skipped, len(images), agreed.signum)


def run_epoch(loop: Loop, state: TrainState, watch: SignalWatch, rollback: NormRollback, hooks: Hooks) -> None:
    """One pass over the loader (or what is left of it after a mid-epoch resume): every step with
    the hooks due at it, and a checkpoint at the end of a step on a signal any process received
    (all of them checkpoint at that same step). The step's phases are marked for
    ``python -m cbn_detect.bench profile`` (``runtime.phases``: free otherwise)."""
    loop.model.train()
    hooks.before_epoch(state)
    last = time.perf_counter()
    batches = iter(loop.loader)
    while (batch := _next_batch(batches, loop.device)) is not None:
        due = hooks.due_at_step(state.step + 1)
        due.before_step(state)
        result = train_step(loop, state, *batch, watch, rollback, due)
        now = time.perf_counter()
        state.train_time_s += now - last  # the step's agreement synchronised already
        last = now
        due.after_step(state, result)
        if result.signum is not None:
            _checkpoint_and_hand_on(loop, state, watch, result.signum)


def fit(loop: Loop, state: TrainState, hooks: Sequence[HookBase]) -> TrainState:
    """Train from ``state`` to ``settings.epochs`` with ``hooks`` (progress, metrics, checkpoints,
    evaluation: the composition root's list), and checkpoint on SIGTERM/SIGUSR1/2 (received by any
    process: all of them checkpoint at the same step)."""
    timed = Hooks(hooks)
    rollback = NormRollback(loop.net)
    settings = loop.settings
    start_epoch(loop.loader, state.epoch, state.epoch_step)
    per_epoch = state.epoch_step + len(loop.loader)  # a resumed epoch's loader skips the steps done
    total = per_epoch * settings.epochs
    if state.step < total:
        resumed = f", resuming after step {state.step}" if state.step else ""
        log.info("training %d steps (%d epochs of %d)%s", total, settings.epochs, per_epoch, resumed)
    with SignalWatch() as watch:
        timed.before_train(state, total)
        try:
            while state.epoch < settings.epochs:
                start_epoch(loop.loader, state.epoch, state.epoch_step)
                if state.epoch_step == 0:
                    state.epoch_losses = []
                start = time.perf_counter()
                run_epoch(loop, state, watch, rollback, timed)
                state.epoch += 1
                state.epoch_step = 0
                mean = float(np.mean(state.epoch_losses)) if state.epoch_losses else math.nan
                log.info(
                    "epoch %d/%d done: mean loss %.4f, %.1f s",
                    state.epoch,
                    settings.epochs,
                    mean,
                    time.perf_counter() - start,
                )
                timed.after_epoch(state)
            _act_on_late_signal(loop, state, watch)
        finally:
            timed.after_train(state)
    return state


def _act_on_late_signal(loop: Loop, state: TrainState, watch: SignalWatch) -> None:
    """A signal that came after the last step's agreement (during its backward or the last
    checkpoint) is acted on now, by every process alike; the weights are checkpointed."""
    flags = torch.tensor(watch.flags(), dtype=torch.float64, device=loop.device)
    if _world_size() > 1:
        dist.all_reduce(flags)
    signum = watch.agreed(flags.tolist())
    if signum is not None:
        _checkpoint_and_hand_on(loop, state, watch, signum)
