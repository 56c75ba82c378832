"""Settings that count training iterations, given either as iterations or as a fraction of the run,
and the iterations at which a run's schedule changes (its lr decays), read from its config alone.

A fixed count (``optim.warmup.iters=100``, ``norm.burnin=1000``) means something different in a
32-step try-out and in a 37k-step VOC run; a fraction keeps its meaning whatever the schedule's
length. Every such setting reads the same way: an int is iterations, a float in (0, 1) a fraction
of the run's training iterations per process, truncated to an int (as CBN's authors turn their
epoch-based burn-in into iterations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cbn_detect.runtime.errors import ConfigError


def resolve_iterations(setting: str, value: int | float, total_steps: int | None) -> int:
    """``value`` of the setting named ``setting`` (for the messages) as a number of iterations."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{setting}={value!r} must be a number")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{setting}={value} must be >= 0 iterations")
        return value
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"{setting}={value}: give iterations as an int >= 0, or a fraction of the training "
            "iterations as a float in (0, 1)"
        )
    if total_steps is None:
        raise ConfigError(f"{setting}={value} is a fraction of the training iterations, which are unknown here")
    return int(value * total_steps)


def milestone_iters(milestones: Sequence[float], total_iters: int) -> list[int]:
    """The iterations ``milestones`` (fractions of the run) fall on, rounded as the schedule rounds them.

    One function for the schedule and for whatever marks its decays (the report's loss curves), so
    a mark sits where the lr really dropped: the lr is multiplied by gamma from 0-based iteration
    ``m`` on, i.e. the first ``m`` steps ran before the decay.
    """
    total = max(1, total_iters)
    return [round(m * total) for m in milestones]


def lr_decay_steps(optim_cfg: Mapping[str, Any], total_iters: int) -> list[int]:
    """The iterations at which the configured schedule multiplies the lr by gamma (``optim.schedule``
    of a run's config, ``total_iters`` its training iterations per process). Empty for cosine, which
    decays a little every iteration, and for constant."""
    schedule = optim_cfg["schedule"]
    if str(schedule["name"]) != "step":
        return []
    return milestone_iters(list(schedule["milestones"]), total_iters)
