"""Optimizer and per-iteration learning-rate schedule from the ``optim`` config group."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from cbn_detect.runtime.errors import ConfigError


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
        self.milestone_iters = [round(m * self.total_iters) for m in milestones]
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: DictConfig, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupSchedule(
        total_iters=total_iters,
        warmup_iters=int(optim_cfg.warmup.iters),
        warmup_factor=float(optim_cfg.warmup.factor),
        name=str(optim_cfg.schedule.name),
        milestones=list(optim_cfg.schedule.milestones),
        gamma=float(optim_cfg.schedule.gamma),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
