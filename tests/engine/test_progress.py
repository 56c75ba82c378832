"""Progress for the person waiting: lines off a terminal (with the job's name when jobs share a
console), a bar on one, one early warning for a run that will take too long."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cbn_detect.engine.hooks import SlowRunCheck
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.progress import Progress, ProgressSettings, format_duration
from tests.conftest import REPO, TINY_RUN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_lines_say_how_far_how_fast_and_how_long_still(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cbn_detect.progress")
    clock = Clock()
    settings = ProgressSettings("lines", every_s=10, name="retinanet_tiny/bn/b4/s0")
    progress = Progress(settings, "train", 100, unit="step", clock=clock)
    clock.now += 7  # the first step: start-up, left out of the rate
    progress.update(1, images=8, epoch="1/10", loss=1.5)
    for _ in range(9):  # 2 s a step of 8 images: 4 img/s, 90 steps left -> 3 min
        clock.now += 2
        progress.update(1, images=8, epoch="1/10", loss=1.25)
    # a line once 10 s have passed since the last (or the start): after steps 3 and 8
    assert _messages(caplog) == [
        "retinanet_tiny/bn/b4/s0 train 3/100 steps (3%) epoch 1/10 loss 1.25, 4 img/s, ETA 3m14s",
        "retinanet_tiny/bn/b4/s0 train 8/100 steps (8%) epoch 1/10 loss 1.25, 4 img/s, ETA 3m04s",
    ]
    clock.now += 2 * 90
    progress.update(90, images=8 * 90)  # the last update always gets its line
    assert _messages(caplog)[-1] == "retinanet_tiny/bn/b4/s0 train 100/100 steps (100%), 4 img/s, done in 3m25s"


def test_every_0_is_a_line_per_update_and_no_name_means_no_prefix(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cbn_detect.progress")
    clock = Clock()
    progress = Progress(ProgressSettings("lines", every_s=0), "eval", 3, unit="image", clock=clock)
    for _ in range(3):
        clock.now += 0.5
        progress.update(1, images=1)
    assert [line.split(" (")[0] for line in _messages(caplog)] == [
        "eval 1/3 images",
        "eval 2/3 images",
        "eval 3/3 images",
    ]
    assert "2 img/s" in _messages(caplog)[1]


def test_auto_is_a_bar_on_a_terminal_lines_elsewhere_and_nothing_off_the_main_process() -> None:
    assert ProgressSettings.resolve("auto", 30, stream=Terminal()).mode == "bar"
    assert ProgressSettings.resolve("auto", 30, stream=io.StringIO()).mode == "lines"
    assert ProgressSettings.resolve("on", 30).mode == "bar"  # the old value of train.progress
    assert ProgressSettings.resolve("lines", 5, "x", main=False).mode == "off"
    with pytest.raises(ConfigError, match="train.progress=sometimes"):
        ProgressSettings.resolve("sometimes", 30)
    with pytest.raises(ConfigError, match="progress_every_s"):
        ProgressSettings.resolve("lines", -1)


def test_a_bar_counts_the_steps_without_log_lines(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="cbn_detect.progress")
    with ProgressSettings("bar", name="job").track("train", 4, unit="step") as progress:
        for _ in range(4):
            progress.update(1, images=2, loss=0.5)
        assert progress.done == 4
    assert not _messages(caplog)
    assert "job train" in capsys.readouterr().err  # tqdm's own line, on stderr


def test_durations_read_at_a_glance() -> None:
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600 * 19.6, 86400 * 2.2, float("nan"))] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "19h36m",
        "2d04h",
        "?",
    ]


def _slow_run(step_s: float, limit_h: float | None, steps: int, total: int = 1000) -> tuple[SlowRunCheck, list[str]]:
    handler_records: list[str] = []
    clock = Clock()
    progress = Progress(ProgressSettings(), "train", total, unit="step", clock=clock)
    check = SlowRunCheck(limit_h, device="cpu", name="ssd300/bn/b2/s0")

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handler_records.append(record.getMessage())

    logger = logging.getLogger("cbn_detect.engine.hooks")
    handler = Capture(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        for _ in range(steps):
            clock.now += step_s
            progress.update(1, images=2)
            check.check(progress)
    finally:
        logger.removeHandler(handler)
    return check, handler_records


def test_a_slow_run_is_warned_about_once_after_its_first_steps() -> None:
    # ssd300 on CPU: 49 s a step. The estimate is made after the second step (49 s >= 30 s measured).
    check, warnings = _slow_run(49.0, 1.0, steps=2, total=1440)
    assert check.decided and len(warnings) == 1
    assert warnings[0].startswith(
        "ssd300/bn/b2/s0: this run is slow: at 49 s a step (0.0408 img/s), "
        "the 1438 training steps left take about 19h34m"
    )
    assert "train.slow_warning_h=1" in warnings[0] and "device=cuda" in warnings[0]
    _, warnings = _slow_run(49.0, 1.0, steps=50, total=1440)
    assert len(warnings) == 1  # once, not at every step


def test_a_fast_run_or_no_limit_gives_no_warning_and_the_decision_waits_for_enough_steps() -> None:
    check, warnings = _slow_run(0.5, 1.0, steps=20)  # 1000 x 0.5 s: 8 minutes
    assert check.decided and not warnings
    check, warnings = _slow_run(10.0, None, steps=20)
    assert not check.decided and not warnings
    check, _ = _slow_run(1.0, 1e-9, steps=5)  # 4 steps measured, 4 s: not yet decided
    assert not check.decided
    check, warnings = _slow_run(1.0, 1e-9, steps=6)
    assert check.decided and len(warnings) == 1


def _train(tmp_path: Path, *args: str, multirun: bool = False) -> str:
    """A tiny run under pipes (not a terminal), its console output."""
    flags = ["-m"] if multirun else []
    proc = subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", *flags, *TINY_RUN, "wandb.mode=disabled", "eval.coco=false", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_multirun_under_a_pipe_prints_named_progress_lines_the_slow_warning_and_evaluation_progress(
    tmp_path: Path,
) -> None:
    output = _train(
        tmp_path,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "seed=0",
        "train.progress_every_s=0",
        "train.slow_warning_h=1e-9",
        multirun=True,
    )
    name = "retinanet_tiny/bn/b4/s0"
    train = re.findall(rf"{re.escape(name)} train (\d+)/8 steps \(\d+%\) epoch (\d)/2 loss [\d.]+, (.*)", output)
    assert [int(step) for step, _, _ in train] == list(range(1, 9))  # a line per step at progress_every_s=0
    assert all(re.fullmatch(r"[\d.]+ img/s, ETA \S+", rest) for _, _, rest in train[1:-1]), train
    assert re.fullmatch(r"[\d.]+ img/s, done in \S+", train[-1][2])
    slow = [line for line in output.splitlines() if "this run is slow" in line]
    assert (
        len(slow) == 1 and f"{name}: this run is slow: at " in slow[0] and "training steps left take about" in slow[0]
    )
    assert re.search(rf"{re.escape(name)} eval 8/8 images \(100%\), .*done in", output)
    # eval.fps_images=2: the timed images (each run model-only and end-to-end), not the warm-up
    assert re.search(rf"{re.escape(name)} fps 2/2 images \(100%\), [\d.]+ img/s, done in", output)
    assert "\r" not in output  # no bar


def test_a_single_run_under_a_pipe_prints_a_line_per_interval_without_a_name(tmp_path: Path) -> None:
    output = _train(tmp_path, f"hydra.run.dir={tmp_path / 'run'}")  # progress_every_s=30: longer than the run
    lines = re.findall(r"\] - (.*(?:train|eval|fps) \d+/\d+ (?:steps|images).*)", output)
    assert [line.split(" (")[0] for line in lines] == ["train 8/8 steps", "eval 8/8 images", "fps 2/2 images"]
    assert "this run is slow" not in output and "retinanet_tiny/bn" not in "".join(lines)
