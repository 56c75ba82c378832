"""An interrupted run with loader workers resumes bit for bit, wherever it stopped: each sample's
augmentation is a function of (seed, epoch, index), not of the worker that produced it."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cbn_detect.data.build import build_dataset, start_epoch, train_loader
from cbn_detect.data.ssd_transforms import ssd_train_transforms
from tests.conftest import CONF_DIR, REPO, TINY_RUN

# 128 px images make a step slow enough (~0.1 s) for a signal to land inside the epoch we aim at.
# 16 images at batch 4: 4 steps an epoch, 8 in all; the signals land in the second epoch.
WORKERS_RUN = [
    *TINY_RUN,
    "data.source.image_size=128",
    "model.min_size=128",
    "model.max_size=128",
    "data.workers=2",
    "eval.coco=false",
    "diagnostics.level=off",
    "wandb.mode=disabled",
]
STEPS = 8


def _train(run_dir: Path) -> subprocess.Popen:
    """``python -m cbn_detect.train`` in a session of its own, so that a signal can reach it and its
    loader workers together, as SLURM's does."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={run_dir}", *WORKERS_RUN],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _output(proc: subprocess.Popen) -> str:
    """The run's output once it ended; a run still going after 10 minutes is killed, workers too."""
    try:
        return proc.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _finish(run_dir: Path) -> None:
    proc = _train(run_dir)
    output = _output(proc)
    assert proc.returncode == 0, output[-3000:]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if "loss" in r]


def _signal_after_step(proc: subprocess.Popen, run_dir: Path, step: int, signum: int) -> str:
    """Send ``signum`` to the run's whole process group once ``step`` is logged, i.e. while it
    computes the next one; return its output."""
    deadline = time.monotonic() + 300
    while step not in _logged_steps(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the signal: " + proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signum)
    return _output(proc)


def _assert_identical(straight: Path, resumed: Path) -> None:
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    for key in (
        "status",
        "map_voc07",
        "map_area",
        "ap_per_class",
        "loss_variance",
        "loss_variance_window",
        "final_loss",
        "steps",
        "epochs",
        "nonfinite_steps",
    ):
        assert a[key] == b[key], key
    weights_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)["model"]
    weights_b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert weights_a.keys() == weights_b.keys()
    assert [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])] == []
    # The resumed log neither repeats nor skips a step, and every loss is the uninterrupted one.
    losses_a = [
        json.loads(line)["loss"]
        for line in (straight / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    losses_b = [
        json.loads(line)["loss"]
        for line in (resumed / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert _logged_steps(resumed) == list(range(1, STEPS + 1))
    assert losses_a == losses_b


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted ``data.workers=2`` run both resume tests compare against."""
    run_dir = tmp_path_factory.mktemp("workers") / "straight"
    _finish(run_dir)
    return run_dir


@pytest.mark.slow
def test_a_kill_in_epoch_two_resumes_from_the_epoch_checkpoint_bit_for_bit(straight: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "killed"
    proc = _train(interrupted)
    _signal_after_step(proc, interrupted, 5, signal.SIGKILL)  # steps 5..8 are epoch 2
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=False)["state"]
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 0, 4)
    # The workers that produced epoch 1 (and advanced their RNGs over it) are gone; fresh ones
    # produce the rest.
    _finish(interrupted)
    _assert_identical(straight, interrupted)


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_resumes_mid_epoch_bit_for_bit(straight: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "terminated"
    proc = _train(interrupted)
    output = _signal_after_step(proc, interrupted, 5, signal.SIGTERM)
    # The workers got the signal as well and kept working: the training process checkpointed at
    # the next step boundary and stopped.
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "rerun the same command to resume" in output
    saved = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=False)["state"]
    assert saved["epoch"] == 1 and 0 < saved["epoch_step"] < 4, saved  # inside epoch 2
    _finish(interrupted)
    _assert_identical(straight, interrupted)


def _batches(dataset, workers: int, epoch: int, done_batches: int = 0) -> list:
    loader = train_loader(dataset, batch=4, workers=workers, seed=3, world_size=1, rank=0)
    start_epoch(loader, epoch, done_batches)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x, y) for x, y in zip(images_a, images_b))
        and all(
            torch.equal(s["boxes"], t["boxes"]) and torch.equal(s["labels"], t["labels"])
            for s, t in zip(targets_a, targets_b)
        )
        for (images_a, targets_a), (images_b, targets_b) in zip(a, b)
    )


def test_a_samples_augmentation_depends_on_seed_epoch_and_index_only() -> None:
    """SSD's augmentation draws the most (photometric distortion, zoom-out, IoU crop, flip)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=TINY_RUN)
    dataset = build_dataset(cfg.data, train=True, transforms=ssd_train_transforms(64, 0.5, (0.5, 0.5, 0.5)))
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    in_process = _batches(dataset, 0, epoch=1)
    # Loading leaves the training process's RNGs alone.
    assert torch.equal(torch.get_rng_state(), rngs[0])
    assert random.getstate() == rngs[1] and np.array_equal(np.random.get_state()[1], rngs[2])
    assert len(in_process) == 4
    assert _same(_batches(dataset, 2, epoch=1), in_process)  # any number of workers
    assert _same(_batches(dataset, 2, epoch=1, done_batches=2), in_process[2:])  # a mid-epoch start
    again = _batches(dataset, 0, epoch=2)
    assert not _same(again, in_process)  # another epoch: another order and other augmentations


def test_loader_workers_outlive_stop_signals_while_the_training_process_runs() -> None:
    """SLURM signals every process of a job; a worker that died of it would fail the step the
    training process is about to checkpoint. (That they still end when it exits, instead of being
    waited for forever, the SIGTERM run above shows.)"""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=TINY_RUN)
    dataset = build_dataset(cfg.data, train=True, transforms=None)
    loader = train_loader(dataset, batch=4, workers=2, seed=0, world_size=1, rank=0)
    start_epoch(loader, 0, 0)
    before = {child.pid for child in multiprocessing.active_children()}
    batches = iter(loader)
    next(batches), next(batches)  # one from each worker: both have started
    workers = [child for child in multiprocessing.active_children() if child.pid not in before]
    assert len(workers) == 2
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        for worker in workers:
            os.kill(worker.pid, signum)
    time.sleep(0.5)
    assert len(list(batches)) == 2 and all(w.is_alive() for w in workers)
    del batches, loader  # the loader's own shutdown still ends them
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
