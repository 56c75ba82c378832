"""Checks before training starts, for what a norm would only reveal mid-training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from cbn_detect.norm import norm_spec

log = logging.getLogger(__name__)


class RunSkipped(Exception):
    """The configured norm cannot run at this batch on this model. The job records status
    ``skipped`` with the reason (a sweep's report shows it) instead of failing."""


def smallest_normalized_map(net: nn.Module, side: int, device: torch.device) -> tuple[int, str]:
    """(values per channel, layer path) of the norm layer that sees the smallest feature map for
    one ``side`` x ``side`` image."""
    smallest: list[tuple[int, str]] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args, path=path: smallest.append((args[0][0, 0].numel(), path)))
        for path, module in net.named_modules()
        if isinstance(getattr(module, "running_mean", None), torch.Tensor)
    ]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net([torch.zeros(3, side, side, device=device)])
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    return min(smallest, default=(2, ""))


def check_batch_statistics(
    net: nn.Module, norm: str, batch: int, world_size: int, burnin: int, side: int, device: torch.device
) -> None:
    """Raise :class:`RunSkipped` when a norm would take batch statistics of one value per channel.

    A norm that normalises with the batch's statistics cannot train on a 1x1 feature map with one
    image. SyncBN pools the images of all processes; CBN's plain-BN burn-in (``burnin``
    iterations) is BN, but with ``norm.burnin=0`` it pools its window from the first step on.
    """
    spec = norm_spec(norm)
    if spec.across_processes and world_size == 1:
        log.warning(
            "norm=%s in a single process is plain BN; run several processes (processes=N, torchrun, "
            "SLURM tasks) to synchronise",
            norm,
        )
    images = batch * (world_size if spec.across_processes else 1)
    if not spec.batch_statistics or images > 1 or (spec.burnin and burnin == 0):
        return
    values, path = smallest_normalized_map(net, side, device)
    if values > 1:
        return
    what = f"its plain-BN burn-in ({burnin} iterations)" if spec.burnin else "its batch statistics"
    advice = "norm.burnin=0, norm=gn" if spec.burnin else "norm=gn, norm=cbn with norm.burnin=0"
    raise RunSkipped(
        f"data.batch=1 with norm={norm}: layer {path} normalizes a 1x1 feature map, so {what} would "
        f"come from a single value per channel. Use {advice}, or data.batch >= 2."
    )
