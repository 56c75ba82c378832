"""`python -m cbn_detect.bench profile`, run tiny: every phase in the table, shares adding up to the
wall time, the training phases measured; and the phase timer costing nothing in an ordinary run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cbn_detect import train as train_module
from cbn_detect.bench.__main__ import main
from cbn_detect.bench.profile import PHASES, merged_overrides
from cbn_detect.engine import trainer
from cbn_detect.runtime import phases
from cbn_detect.runtime.phases import PhaseTimer, active_timer, phase, timed, timing
from tests.engine.test_train import tiny_cfg

TRAINING_PHASES = ("data", "forward", "loss", "sync", "backward", "optimizer")


def test_tiny_profile_accounts_for_the_whole_wall_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "--tiny", "--json", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# profile: retinanet_tiny with bn, batch 4 x 1 process(es)")
    assert lines[1].split() == ["phase", "seconds", "share", "calls", "what"]
    table = [line.split() for line in lines[2:-1]]
    assert [row[0] for row in table] == [*PHASES, "other"]
    assert lines[-1].split()[0] == "total" and lines[-1].split()[2] == "100.0%"

    report = json.loads(out.read_text())
    rows = report["phases"]
    assert list(rows) == [*PHASES, "other"]
    assert sum(r["share_pct"] for r in rows.values()) == pytest.approx(100.0, abs=1e-6)
    assert sum(r["seconds"] for r in rows.values()) == pytest.approx(report["wall_s"], rel=1e-9)
    assert all(r["seconds"] >= 0 for r in rows.values())
    # Everything a completed run does was measured (TINY: 16 images at batch 4, diagnostics every 2).
    for name in (*TRAINING_PHASES, "setup", "diagnostics", "logging", "checkpoint", "evaluation", "fps"):
        assert rows[name]["seconds"] > 0, name
    assert rows["forward"]["calls"] == rows["backward"]["calls"] == 4
    assert rows["diagnostics"]["calls"] == 2 * 2  # before and after the optimizer step, at steps 2 and 4
    assert rows["loss"]["calls"] == 2 * 4 and rows["sync"]["calls"] == 4  # the model's and the trainer's part
    assert rows["checkpoint"]["calls"] == 1 and rows["fps"]["calls"] == 1
    # The run kept its own results, as any cbn_detect.train run does.
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 4


def test_an_ordinary_run_passes_the_phases_but_times_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a profile, every ``phase`` the trainer and the composition root enter is the one
    shared do-nothing context manager: no clock read, no synchronisation, no allocation."""
    noop = phase("probe")
    assert phase("other") is noop and active_timer() is None
    entered: list[tuple[str, object]] = []

    def spy(name: str) -> object:
        context = phases.phase(name)
        entered.append((name, context))
        return context

    monkeypatch.setattr(trainer, "phase", spy)
    monkeypatch.setattr(train_module, "phase", spy)
    assert train_module.run(tiny_cfg("train.epochs=1"), tmp_path).status == "completed"
    assert set(TRAINING_PHASES) | {"setup", "evaluation", "fps", "checkpoint"} <= {name for name, _ in entered}
    assert all(context is noop for _, context in entered)


def test_the_timer_counts_each_second_once_in_the_innermost_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0, 3.0, 4.0, 10.0, 11.0])
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(clock))
    timer = PhaseTimer(synchronize=False)
    with timing(timer):
        assert active_timer() is timer
        with phase("forward"):  # 0 .. 4, of which 1 .. 3 inside "loss"
            with phase("loss"):
                pass
        with pytest.raises(ValueError), phase("loss"):  # 10 .. 11, closed by the exception too
            raise ValueError
    assert active_timer() is None
    assert timer.totals() == {"loss": {"seconds": 3.0, "count": 2}, "forward": {"seconds": 2.0, "count": 1}}


def test_timed_methods_are_phases_and_profiles_do_not_nest() -> None:
    class Model:
        @timed("loss")
        def compute_loss(self, x: int) -> int:
            """doc"""
            time.sleep(0.001)
            return x + 1

    assert Model().compute_loss(1) == 2 and Model.compute_loss.__doc__ == "doc"
    timer = PhaseTimer()
    with timing(timer):
        assert Model().compute_loss(2) == 3
        with pytest.raises(RuntimeError, match="already installed"), timing(PhaseTimer()):
            pass
    assert timer.counts == {"loss": 1} and timer.seconds["loss"] > 0


def test_explicit_overrides_replace_the_presets_of_the_same_key() -> None:
    assert merged_overrides(("train.epochs=1", "data.batch=4"), ["data.batch=8", "norm=cbn"]) == [
        "train.epochs=1",
        "data.batch=8",
        "norm=cbn",
    ]
