"""Every norm of the study by name: how to build it and what the rest of the program needs to
know about it (its traits), in one table. Option defaults live in one place, the layers'
constructors, CBN's burn-in excepted (:data:`BURNIN_FRACTION` says why); the conf/norm files list
the same values for the command line (tests/test_config_defaults.py keeps the three equal)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cbn_detect.norm.brn import BatchRenorm2d
from cbn_detect.norm.cbn import CrossIterationBatchNorm2d
from cbn_detect.norm.syncbn import SyncBatchNorm2d
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.iterations import resolve_iterations


def gn_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of the channel count not above ``max_groups`` (32 for GN's paper)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def group_norm(num_features: int, num_groups: int = 32, eps: float = 1e-5) -> nn.Module:
    """GroupNorm (Wu & He 2018) with ``num_groups``, or the largest divisor of the channel count
    below it: batch-independent, the usual from-scratch detection baseline."""
    return nn.GroupNorm(gn_groups(num_features, num_groups), num_features, eps=eps)


def no_norm(num_features: int) -> nn.Module:
    """No normalization; convert_norm gives the producing conv a bias instead."""
    return nn.Identity()


@dataclass(frozen=True)
class NormSpec:
    """A norm of the study: its layer factory ``build(num_features, **options)`` and its traits."""

    build: Callable[..., nn.Module]
    batch_statistics: bool
    """Normalises with statistics of the training batch: cannot learn from one value per channel."""
    across_processes: bool = False
    """Its batch is the union of every process's batch (SyncBN)."""
    burnin: bool = False
    """Starts with ``norm.burnin`` plain-BN iterations (CBN), whose statistics are the batch's."""


NORMS: dict[str, NormSpec] = {
    "bn": NormSpec(nn.BatchNorm2d, batch_statistics=True),
    "syncbn": NormSpec(SyncBatchNorm2d, batch_statistics=True, across_processes=True),
    "cbn": NormSpec(CrossIterationBatchNorm2d, batch_statistics=True, burnin=True),
    # CBN without the Taylor compensation: the ablation that shows what it buys
    "cbn_naive": NormSpec(functools.partial(CrossIterationBatchNorm2d, rho=0.0), batch_statistics=True, burnin=True),
    "gn": NormSpec(group_norm, batch_statistics=False),
    # with no pretrained statistics to freeze, a fixed identity affine map
    "frozenbn": NormSpec(FrozenBatchNorm2d, batch_statistics=False),
    "brn": NormSpec(BatchRenorm2d, batch_statistics=True),
    "none": NormSpec(no_norm, batch_statistics=False),
}

NORM_NAMES: tuple[str, ...] = tuple(NORMS)

BURNIN_FRACTION = 0.6667
"""The default plain-BN burn-in of the norms that have one (``NormSpec.burnin``): a fraction of the
run's training iterations, the CBN authors' 8 of 12 epochs (conf/norm/cbn.yaml). The one default
that cannot be the constructor's: a layer is built before, and without knowing, the run's length,
so ``CrossIterationBatchNorm2d(burnin=...)`` takes iterations (its own default serves a layer used
outside a run) and :func:`resolve_burnin` turns this fraction into them for a run. conf/config.yaml
states it as ``cbn_burnin``, which the conf/norm files of these norms read."""

# Constructor arguments that are not hyper-parameters of the study.
_NOT_OPTIONS = {"num_features", "affine", "track_running_stats", "bias", "device", "dtype", "process_group"}


def norm_spec(name: str) -> NormSpec:
    if name not in NORMS:
        raise ConfigError(f"unknown norm {name!r}; valid names: {', '.join(NORM_NAMES)}")
    return NORMS[name]


def norm_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters a norm accepts (its config keys besides ``name`` and ``where``), with
    their defaults: the constructor's, minus what the registry fixes (cbn_naive's ``rho``), and a
    burn-in as :data:`BURNIN_FRACTION` of the run."""
    spec = norm_spec(name)
    fixed = set(spec.build.keywords) if isinstance(spec.build, functools.partial) else set()
    defaults = {
        key: param.default
        for key, param in inspect.signature(spec.build).parameters.items()
        if key not in _NOT_OPTIONS | fixed and param.kind is not param.VAR_KEYWORD
    }
    if spec.burnin:
        defaults["burnin"] = BURNIN_FRACTION
    return defaults


def norm_options(name: str) -> tuple[str, ...]:
    """The hyper-parameters a norm accepts (its config keys besides ``name`` and ``where``)."""
    return tuple(norm_defaults(name))


def resolve_burnin(burnin: int | float, total_steps: int | None) -> int:
    """``norm.burnin`` as a number of iterations: an int is one already, a float in (0, 1) is that
    fraction of the run's ``total_steps`` training iterations (per process).

    CBN's authors give the burn-in in epochs (``burnin=8`` of a 12-epoch schedule in their released
    detection configs), which their training script turns into iterations with ``int()``; a
    fraction keeps that meaning whatever the schedule's length, and is truncated the same way.
    """
    return resolve_iterations("norm.burnin", burnin, total_steps)


def build_norm(name: str, num_features: int, **cfg: Any) -> nn.Module:
    """A fresh norm layer for ``num_features`` channels; unknown names or options are errors."""
    valid = norm_options(name)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ConfigError(f"norm {name!r} got unknown option(s) {unknown}; valid options: {list(valid) or 'none'}")
    return norm_spec(name).build(num_features, **cfg)
