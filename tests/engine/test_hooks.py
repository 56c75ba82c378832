"""The training loop's hooks: called in their order, only for the events they override and when
they are due, each call timed under the hook's phase; the job's lock is released however a run
ends; sinks without histograms or pictures take them without being asked what they can do."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cbn_detect import train
from cbn_detect.engine.checkpoint import TrainState
from cbn_detect.engine.hooks import HookBase, StepResult
from cbn_detect.engine.signals import TrainingInterrupted
from cbn_detect.engine.trainer import Hooks
from cbn_detect.runtime import DistInfo
from cbn_detect.runtime.lock import LOCK_FILE, claim_job
from cbn_detect.runtime.phases import PhaseTimer, timing
from cbn_detect.tracking import JsonlSink, LoggingSink


class Every(HookBase):
    """Records its calls; runs its step events every ``every`` steps."""

    def __init__(self, name: str, phase: str, every: int, calls: list[tuple[str, str, int]]) -> None:
        self.name, self.phase, self.every, self.calls = name, phase, every, calls

    def due_at_step(self, step: int) -> bool:
        return step % self.every == 0

    def after_step(self, state: TrainState, result: StepResult) -> None:
        self.calls.append((self.name, "after_step", state.step))


class AtEpochEnd(HookBase):
    phase = "checkpoint"

    def __init__(self, calls: list[tuple[str, str, int]]) -> None:
        self.calls = calls

    def due_after_epoch(self, epoch: int) -> bool:
        return epoch != 2

    def after_epoch(self, state: TrainState) -> None:
        self.calls.append(("epoch", "after_epoch", state.epoch))


def test_hooks_run_in_order_when_due_and_only_their_own_events_are_timed() -> None:
    calls: list[tuple[str, str, int]] = []
    hooks = Hooks([Every("often", "logging", 1, calls), Every("rarely", "diagnostics", 2, calls), AtEpochEnd(calls)])
    result = StepResult(1.0, {}, torch.tensor(0.5), False, 4, None)
    state = TrainState()
    with timing(PhaseTimer(synchronize=False)) as timer:
        for _ in range(4):
            due = hooks.due_at_step(state.step + 1)
            due.before_step(state)
            state.step += 1
            due.after_step(state, result)
        for epoch in (1, 2, 3):
            state.epoch = epoch
            hooks.after_epoch(state)
        hooks.after_train(state)
    assert calls == [
        ("often", "after_step", 1),
        ("often", "after_step", 2),
        ("rarely", "after_step", 2),
        ("often", "after_step", 3),
        ("often", "after_step", 4),
        ("rarely", "after_step", 4),
        ("epoch", "after_epoch", 1),
        ("epoch", "after_epoch", 3),
    ]
    # before_step and after_train are nobody's: no empty calls in the profile
    assert {name: int(row["count"]) for name, row in timer.totals().items()} == {
        "logging": 4,
        "diagnostics": 2,
        "checkpoint": 2,
    }


def test_sinks_ignore_what_they_do_not_show(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    for each in (sink, LoggingSink()):
        assert not each.draws
        each.log_histograms({"weights/w": torch.zeros(2)}, 1)
        each.log_detections("eval/examples", [], ("cat",), 1)
        each.summary({"map_voc07": 0.5})
        each.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("ending", [RuntimeError("a bug"), TrainingInterrupted(signal.SIGTERM, 3), "completed"])
def test_the_job_lock_is_released_however_the_run_ends(
    ending: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = claim_job(tmp_path, DistInfo(), 6.0)
    assert lock is not None and (tmp_path / LOCK_FILE).exists()
    job = SimpleNamespace(sinks=[LoggingSink()], lock=lock)
    monkeypatch.setattr(train, "setup", lambda cfg, run_dir, group, several_jobs=False: job)
    monkeypatch.setattr(train, "finish", lambda job: None)

    def fit(job: SimpleNamespace) -> None:
        assert (tmp_path / LOCK_FILE).exists()  # held while training
        if isinstance(ending, BaseException):
            raise ending

    monkeypatch.setattr(train, "train", fit)
    if isinstance(ending, BaseException):
        with pytest.raises(type(ending)):
            train.run(None, tmp_path)
    else:
        train.run(None, tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
