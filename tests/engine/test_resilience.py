"""Nothing finished is lost: divergence stops cleanly, a signal checkpoints and the rerun resumes
bit for bit, a kill during a checkpoint write leaves the previous one intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cbn_detect.data.build import class_names
from cbn_detect.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cbn_detect.engine.optim import build_optimizer, build_scheduler
from cbn_detect.engine.precision import Precision
from cbn_detect.models import build_detector
from cbn_detect.runtime.errors import CheckpointError
from cbn_detect.train import run
from tests.conftest import CONF_DIR, REPO, TINY_RUN


def tiny_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY_RUN, *overrides])


def test_persistent_nonfinite_losses_stop_the_run_as_diverged(tmp_path: Path) -> None:
    cfg = tiny_cfg(
        "norm=none",
        "optim.lr=1e12",
        "optim.warmup.iters=0",
        "train.max_grad_norm=null",
        "train.max_nonfinite=3",
        "train.epochs=4",
    )
    results = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == results.status == "diverged"
    assert "3 consecutive steps" in on_disk["error"] and "optim.lr" in on_disk["error"]
    assert on_disk["nonfinite_steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_total"] for r in records if "nonfinite_total" in r] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "last.pt").exists()


def test_diagnostics_reach_metrics_jsonl(tmp_path: Path) -> None:
    run(tiny_cfg("diagnostics.every=2", "train.epochs=1", "eval.coco=false"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in records if any(k.startswith("update_ratio/") for k in r)]
    assert [r["step"] for r in diag] == [2, 4]
    keys = set(diag[0])
    assert {"grad_norm/backbone.stem", "grad_norm/backbone.fpn", "grad_norm/head.classification_head"} <= keys
    assert diag[0]["update_ratio/backbone.layer1"] > 0
    # a whole number of tensors, fewer than all: the step moved most of them (exact counts: below)
    model = build_detector(tiny_cfg().model, num_classes=len(class_names(tiny_cfg().data)))
    trainable = sum(p.requires_grad for p in model.parameters())
    assert all(r["params_unchanged"] == int(r["params_unchanged"]) for r in diag)
    assert all(0 <= r["params_unchanged"] < trainable / 2 for r in diag), (trainable, diag[0]["params_unchanged"])
    assert any(k.startswith("norm/backbone.body.bn1/running_var") for k in keys)


def test_update_stats_count_unchanged_tensors_and_give_each_groups_update_ratio() -> None:
    """Known by hand: SGD at lr 0.5 moves ``a.weight`` by -0.5 * grad; ``b`` gets no gradient (unused)
    and ``c`` sits in a group with lr 0, so exactly 2 tensors stay unchanged. The update ratio of
    group "a" is ||0.5 * grad|| / ||w||, of "b" and "c" 0."""
    from torch import nn

    from cbn_detect.engine.diagnostics import GradientMonitor

    model = nn.ModuleDict(
        {"a": nn.Linear(2, 1, bias=False), "b": nn.Linear(2, 1, bias=False), "c": nn.Linear(2, 1, bias=False)}
    )
    with torch.no_grad():
        model["a"].weight.copy_(torch.tensor([[3.0, 4.0]]))  # norm 5
    monitor = GradientMonitor(model)
    optimizer = torch.optim.SGD(
        [{"params": [model["a"].weight, model["b"].weight]}, {"params": [model["c"].weight], "lr": 0.0}], lr=0.5
    )
    x = torch.tensor([[1.0, 2.0]])
    (model["a"](x) + model["c"](x)).sum().backward()  # d/dw of w . x: grad x = (1, 2), norm sqrt(5)
    monitor.snapshot()
    optimizer.step()
    stats = monitor.update_stats()
    assert stats["params_unchanged"] == 2.0
    assert stats["update_ratio/a"] == pytest.approx(0.5 * 5**0.5 / 5, rel=1e-6)
    assert stats["update_ratio/b"] == 0.0 and stats["update_ratio/c"] == 0.0


def _train(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# 128 px images make a step slow enough (~0.1 s) for the signal to land inside the run.
RESUME_RUN = [
    *TINY_RUN,
    "data.source.image_size=128",
    "model.min_size=128",
    "model.max_size=128",
    "train.epochs=4",
    "eval.coco=false",
    "diagnostics.level=off",
]


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_ends_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    proc = _train([f"hydra.run.dir={straight}", *RESUME_RUN], tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]

    proc = _train([f"hydra.run.dir={interrupted}", *RESUME_RUN], tmp_path)
    checkpoint = interrupted / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "rerun the same command to resume" in output
    assert json.loads((interrupted / "results.json").read_text())["status"] == "interrupted"
    saved = torch.load(checkpoint, weights_only=False)["state"]
    assert 4 <= saved["step"] < 16  # after the first epoch (4 steps), before the end

    proc = _train([f"hydra.run.dir={interrupted}", *RESUME_RUN], tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((interrupted / "results.json").read_text())
    for key in ("status", "map_voc07", "map_area", "ap_per_class", "loss_variance", "final_loss", "steps", "epochs"):
        assert a[key] == b[key], key
    weights_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)["model"]
    weights_b = torch.load(checkpoint, weights_only=False)["model"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    steps_b = [
        json.loads(line)["step"]
        for line in (interrupted / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps_b == list(range(1, 17))  # the resumed log neither repeats nor skips a step


WRITER = """
import sys, time, torch
from pathlib import Path
from cbn_detect.runtime import io
def slow(handle):
    handle.write(b"x" * 1_000_000)
    handle.flush()
    Path(sys.argv[2]).touch()
    time.sleep(600)
io._atomic_write(Path(sys.argv[1]), slow)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_resumable(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    cfg = tiny_cfg()
    optimizer = build_optimizer(model, cfg.optim, 4)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(
        path, model, optimizer, scheduler, TrainState(epoch=1, step=7), Precision("off", torch.device("cpu"))
    )
    ready = tmp_path / "ready"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(ready)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    state = load_checkpoint(path, model, optimizer, scheduler, Precision("off", torch.device("cpu")))
    assert (state.epoch, state.step) == (1, 7)


def test_an_unreadable_checkpoint_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    model = torch.nn.Linear(3, 2)
    cfg = tiny_cfg()
    optimizer = build_optimizer(model, cfg.optim, 4)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(
            path, model, optimizer, build_scheduler(optimizer, cfg.optim, 10), Precision("off", torch.device("cpu"))
        )
