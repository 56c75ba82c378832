"""One factory per norm name: the single place that maps a config's ``norm.name`` to a layer."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cbn_detect.norm.brn import BatchRenorm2d
from cbn_detect.norm.cbn import CrossIterationBatchNorm2d
from cbn_detect.norm.syncbn import SyncBatchNorm2d


def gn_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of the channel count not above ``max_groups`` (32 for GN's paper)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def _bn(num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    """Plain BatchNorm: the baseline; its statistics are only as good as the per-process batch."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


def _syncbn(num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    return SyncBatchNorm2d(num_features, eps=eps, momentum=momentum)


def _cbn(
    num_features: int,
    window: int = 4,
    burnin: int = 1000,
    rho: float = 1.0,
    eps: float = 1e-5,
    momentum: float = 0.1,
    fused: str = "auto",
) -> nn.Module:
    return CrossIterationBatchNorm2d(num_features, window, burnin, rho, eps, momentum, fused)


def _cbn_naive(
    num_features: int,
    window: int = 4,
    burnin: int = 1000,
    eps: float = 1e-5,
    momentum: float = 0.1,
    fused: str = "auto",
) -> nn.Module:
    """CBN without the Taylor compensation (rho = 0): the ablation that shows it matters."""
    return CrossIterationBatchNorm2d(num_features, window, burnin, 0.0, eps, momentum, fused)


def _gn(num_features: int, num_groups: int = 32, eps: float = 1e-5) -> nn.Module:
    """GroupNorm: batch-independent, the usual from-scratch detection baseline (Wu & He 2018)."""
    return nn.GroupNorm(gn_groups(num_features, num_groups), num_features, eps=eps)


def _frozenbn(num_features: int, eps: float = 1e-5) -> nn.Module:
    """Fixed affine map: with no pretrained statistics to freeze it is the identity plus a bias."""
    return FrozenBatchNorm2d(num_features, eps=eps)


def _brn(
    num_features: int,
    eps: float = 1e-5,
    momentum: float = 0.01,
    r_max: float = 3.0,
    d_max: float = 5.0,
    ramp_start: int = 1000,
    ramp_end: int = 5000,
) -> nn.Module:
    return BatchRenorm2d(num_features, eps, momentum, r_max, d_max, ramp_start, ramp_end)


def _none(num_features: int) -> nn.Module:
    """No normalization; convert_norm gives the producing conv a bias instead."""
    return nn.Identity()


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "bn": _bn,
    "syncbn": _syncbn,
    "cbn": _cbn,
    "cbn_naive": _cbn_naive,
    "gn": _gn,
    "frozenbn": _frozenbn,
    "brn": _brn,
    "none": _none,
}

NORM_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def norm_options(name: str) -> tuple[str, ...]:
    """The hyper-parameters a norm accepts (its config keys besides ``name`` and ``where``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(NORM_NAMES)}")
    return tuple(inspect.signature(_FACTORIES[name]).parameters)[1:]


def resolve_burnin(burnin: int | float, total_steps: int | None) -> int:
    """``norm.burnin`` as a number of iterations: an int is one already, a float in (0, 1) is that
    fraction of the run's ``total_steps`` training iterations (per process).

    CBN's authors give the burn-in in epochs (``burnin=8`` of a 12-epoch schedule in their released
    detection configs), which their training script turns into iterations with ``int()``; a
    fraction keeps that meaning whatever the schedule's length, and is truncated the same way.
    """
    if isinstance(burnin, bool) or not isinstance(burnin, (int, float)):
        raise ValueError(f"norm.burnin={burnin!r} must be a number")
    if isinstance(burnin, int):
        if burnin < 0:
            raise ValueError(f"norm.burnin={burnin} must be >= 0 iterations")
        return burnin
    if not 0.0 < burnin < 1.0:
        raise ValueError(
            f"norm.burnin={burnin}: give iterations as an int >= 0, or a fraction of the training "
            "iterations as a float in (0, 1)"
        )
    if total_steps is None:
        raise ValueError(f"norm.burnin={burnin} is a fraction of the training iterations, which are unknown here")
    return int(burnin * total_steps)


def build_norm(name: str, num_features: int, **cfg: Any) -> nn.Module:
    """A fresh norm layer for ``num_features`` channels; unknown names or options are errors."""
    valid = norm_options(name)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(
            f"norm {name!r} got unknown option(s) {unknown}; valid options: {list(valid) or 'none'}"
        )
    return _FACTORIES[name](num_features, **cfg)
