"""A try-out of a few steps must not train at a learning rate nobody chose without saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cbn_detect.engine.optim import WarmupSchedule, build_scheduler, peak_multiplier
from cbn_detect.runtime.errors import ConfigError
from tests.conftest import REPO, TINY_RUN


def _train(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    run_dir = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", *TINY_RUN, "wandb.mode=disabled", f"hydra.run.dir={run_dir}", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return proc, [row for row in rows if "lr" in row]


def test_a_warm_up_longer_than_the_run_is_one_warning_naming_the_setting_and_a_fraction_fits(tmp_path: Path) -> None:
    proc, _ = _train(tmp_path, "fixed", "optim.warmup.iters=100")  # the recipes' 100 iterations in an 8-step run
    output = proc.stdout + proc.stderr
    assert (
        "optim.warmup.iters=100 is 100 warm-up iterations in a run of 8: "
        "the first lr decay comes before the warm-up ends" in output
    )
    assert "optim.warmup.iters=0.1" in output  # what to change

    proc, rows = _train(tmp_path, "fraction", "optim.warmup.iters=0.25")  # 2 of the 8 iterations
    assert "warm-up iterations in a run of" not in proc.stdout + proc.stderr
    # lr 0.08 x 4 / 16 images; logged after each step, so the warm-up's 2 steps end at the full lr
    assert rows[1]["lr"] == pytest.approx(0.02) and rows[0]["lr"] < 0.02


def _optim_cfg(warmup: object, schedule: str = "step") -> object:
    return OmegaConf.create(
        {
            "warmup": {"iters": warmup, "factor": 0.001},
            "schedule": {"name": schedule, "milestones": [0.67, 0.89], "gamma": 0.1},
        }
    )


@pytest.mark.parametrize(
    "warmup, total, expected",
    # (100, 32): the first decay at round(0.67 x 32) = 21, so the peak is iteration 20 of the warm-up
    [(100, 32, 0.001 * 0.8 + 0.2), (100, 120, 0.001 * 0.21 + 0.79), (100, 180, 1.0), (0.5, 32, 1.0), (0, 32, 1.0)],
)
def test_the_peak_lr_is_reached_at_the_warm_up_end_unless_the_run_or_a_decay_comes_first(
    warmup: int | float, total: int, expected: float
) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(optimizer, _optim_cfg(warmup), total)
    peak = peak_multiplier(scheduler.lr_lambdas[0])
    lrs = [scheduler.lr_lambdas[0](it) for it in range(total)]
    assert peak == pytest.approx(max(lrs)) and peak == pytest.approx(expected)


def test_a_warm_up_fraction_outside_zero_to_one_is_refused_naming_the_setting() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ConfigError, match=r"optim.warmup.iters=1.5: give iterations as an int"):
        build_scheduler(optimizer, _optim_cfg(1.5), 32)
    assert isinstance(WarmupSchedule(10, 0, 1.0, "constant", [], 0.1), WarmupSchedule)
