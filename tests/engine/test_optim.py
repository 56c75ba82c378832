"""Learning-rate scaling, warmup and decay, and parameter groups."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cbn_detect.engine.optim import (
    WarmupSchedule,
    build_optimizer,
    build_scheduler,
    lr_decay_steps,
    milestone_iters,
    scaled_lr,
)
from tests.conftest import CONF_DIR

SGD = OmegaConf.create(
    {
        "lr": 0.01,
        "reference_batch": 16,
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "weight_decay": 1e-4},
        "warmup": {"iters": 10, "factor": 0.001},
        "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1},
    }
)


def test_linear_scaling_rule() -> None:
    assert scaled_lr(SGD, 8) == pytest.approx(0.005)
    assert scaled_lr(OmegaConf.merge(SGD, {"reference_batch": None}), 8) == pytest.approx(0.01)


def test_norm_parameters_and_biases_get_no_weight_decay() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, SGD, total_batch=16)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == pytest.approx(1e-4) and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_warmup_then_steps() -> None:
    schedule = WarmupSchedule(100, warmup_iters=10, warmup_factor=0.001, name="step", milestones=[0.5, 0.75], gamma=0.1)
    assert schedule(0) == pytest.approx(0.001)
    assert schedule(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert schedule(10) == 1.0 and schedule(49) == 1.0
    assert schedule(50) == pytest.approx(0.1) and schedule(75) == pytest.approx(0.01)


def test_cosine_ends_at_zero() -> None:
    schedule = WarmupSchedule(100, warmup_iters=0, warmup_factor=1.0, name="cosine", milestones=[], gamma=0.1)
    assert schedule(0) == 1.0 and schedule(50) == pytest.approx(0.5) and schedule(100) == pytest.approx(0.0)


def test_bad_schedule_names_the_setting() -> None:
    with pytest.raises(ValueError, match="optim.schedule.name"):
        WarmupSchedule(10, 0, 1.0, "linear", [], 0.1)
    with pytest.raises(ValueError, match="optim.schedule.milestones"):
        WarmupSchedule(10, 0, 1.0, "step", [5], 0.1)


def test_scheduler_state_round_trip_continues_the_curve() -> None:
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, SGD, 16)
    sched = build_scheduler(opt, SGD, total_iters=40)
    for _ in range(12):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model, SGD, 16)
    sched2 = build_scheduler(opt2, SGD, total_iters=40)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(10):
        opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched.get_last_lr() == sched2.get_last_lr()
    assert torch.tensor(sched.get_last_lr()[0]) == pytest.approx(0.001)


def test_the_decay_steps_are_where_the_schedule_drops_the_lr() -> None:
    """What the report marks on the loss curves: the iterations where the lr really dropped."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, SGD, 16)
    sched = build_scheduler(opt, SGD, total_iters=40)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])  # the lr step i (0-based) trains with
        opt.step()
        sched.step()
    drops = [i for i in range(11, 40) if lrs[i] < lrs[i - 1] * 0.5]  # after the 10-iteration warmup
    assert drops == [20, 30] == lr_decay_steps(SGD, 40)
    assert milestone_iters([0.5, 0.75], 40) == [20, 30]


def test_decay_steps_of_the_default_sgd_config_and_other_schedules() -> None:
    sgd = OmegaConf.load(CONF_DIR / "optim" / "sgd.yaml")  # milestones 0.67, 0.89
    assert lr_decay_steps(sgd, 96) == [64, 85]  # round(64.32), round(85.44)
    assert lr_decay_steps(OmegaConf.merge(sgd, {"schedule": {"name": "cosine"}}), 96) == []
    assert lr_decay_steps(OmegaConf.merge(sgd, {"schedule": {"name": "constant"}}), 96) == []
    assert milestone_iters([0.5], 0) == [0]  # a schedule of no iterations counts one, as WarmupSchedule does
