"""Optimizer and per-iteration learning-rate schedule from the ``optim`` config group."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.iterations import lr_decay_steps, milestone_iters, resolve_iterations

log = logging.getLogger("cbn_detect.optim")

__all__ = [
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
    "lr_decay_steps",
    "milestone_iters",
    "peak_multiplier",
    "scaled_lr",
    "warn_if_lr_never_peaks",
]


def scaled_lr(optim_cfg: DictConfig, total_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr x total_batch / reference_batch."""
    if optim_cfg.reference_batch is None:
        return float(optim_cfg.lr)
    return float(optim_cfg.lr) * total_batch / float(optim_cfg.reference_batch)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases hurts small-batch runs."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim_cfg: DictConfig, total_batch: int) -> torch.optim.Optimizer:
    weight_decay = float(optim_cfg.optimizer.get("weight_decay", 0.0))
    factory = hydra.utils.instantiate(optim_cfg.optimizer)
    return factory(parameter_groups(model, weight_decay), lr=scaled_lr(optim_cfg, total_batch))


class WarmupSchedule:
    """lr multiplier at iteration ``it``: linear warmup, then step, cosine or constant.

    A callable object rather than a closure so that ``LambdaLR.state_dict`` captures it and a
    resumed run continues on the same curve.
    """

    def __init__(
        self,
        total_iters: int,
        warmup_iters: int,
        warmup_factor: float,
        name: str,
        milestones: Sequence[float],
        gamma: float,
    ) -> None:
        if name not in ("step", "cosine", "constant"):
            raise ConfigError(f"optim.schedule.name={name!r} must be one of step, cosine, constant")
        if any(not 0.0 < m < 1.0 for m in milestones):
            raise ConfigError(f"optim.schedule.milestones={list(milestones)} must be fractions in (0, 1)")
        self.total_iters = max(1, total_iters)
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.name = name
        self.milestone_iters = milestone_iters(milestones, self.total_iters)
        self.gamma = gamma

    def __call__(self, it: int) -> float:
        if self.name == "step":
            decay = self.gamma ** sum(it >= m for m in self.milestone_iters)
        elif self.name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * min(it, self.total_iters) / self.total_iters))
        else:
            decay = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            decay *= self.warmup_factor * (1.0 - alpha) + alpha
        return decay


PEAK_WARNING = 0.9
"""A schedule whose lr never reaches this fraction of ``optim.lr`` (scaled) gets a warning: its
warm-up outlasts the run or its first decay, so the run trains at a learning rate nobody chose."""


def peak_multiplier(schedule: WarmupSchedule) -> float:
    """The largest lr multiplier of the run. Every schedule is non-increasing after the warm-up,
    so the peak lies within the warm-up or at its end."""
    return max(schedule(it) for it in range(min(schedule.warmup_iters, schedule.total_iters - 1) + 1))


def warn_if_lr_never_peaks(schedule: WarmupSchedule, setting: object, base_lr: float) -> None:
    """Short try-outs (a few epochs of a few steps) inherit a warm-up sized for the full recipe:
    100 warm-up iterations and decays at fixed fractions keep a 32-step run at 0.3% of its lr,
    and it ends near mAP 0 with no hint why. Say so, with the setting to change."""
    peak = peak_multiplier(schedule)
    if peak >= PEAK_WARNING:
        return
    decays = [m for m in schedule.milestone_iters if m < schedule.warmup_iters] if schedule.name == "step" else []
    why = "the first lr decay comes" if decays else "the run ends"
    log.warning(
        "optim.warmup.iters=%s is %d warm-up iterations in a run of %d: %s before the warm-up ends, so the lr "
        "peaks at %.3g, %.1f%% of its %.3g; give the warm-up as a fraction of the run (optim.warmup.iters=0.1) "
        "or train longer (train.epochs)",
        setting,
        schedule.warmup_iters,
        schedule.total_iters,
        why,
        peak * base_lr,
        100 * peak,
        base_lr,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: DictConfig, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-iteration schedule of ``total_iters`` training iterations (per process).
    ``optim.warmup.iters`` is iterations (int) or a fraction of the run (float in (0, 1))."""
    warmup = optim_cfg.warmup.iters
    schedule = WarmupSchedule(
        total_iters=total_iters,
        warmup_iters=resolve_iterations("optim.warmup.iters", warmup, total_iters),
        warmup_factor=float(optim_cfg.warmup.factor),
        name=str(optim_cfg.schedule.name),
        milestones=list(optim_cfg.schedule.milestones),
        gamma=float(optim_cfg.schedule.gamma),
    )
    warn_if_lr_never_peaks(schedule, warmup, float(optimizer.param_groups[0]["lr"]))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
