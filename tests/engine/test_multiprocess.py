"""One job as two processes, started the ways a user does it: ``processes=2`` (torch's elastic
launcher) and submitit's local launcher with ``tasks_per_node=2``. SyncBN must then really
synchronise: its first step's statistics equal BN's on the joint batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_RUN

# Four training images: with 2 processes x 2 images (or 1 process x 4) one epoch is one step
# taking every image, so both runs see the same joint batch. No flip: its random draws differ
# between one and two processes.
ONE_STEP = [
    *(o for o in TINY_RUN if not o.startswith(("data.source.num_train", "train.epochs", "data.batch"))),
    "data.source.num_train=4",
    "train.epochs=1",
    "augment.hflip=0",
    "eval.coco=false",
    "diagnostics.level=off",
]


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _norm_statistics(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.slow
def test_syncbn_with_two_processes_equals_bn_on_the_joint_batch(tmp_path: Path) -> None:
    sync_dir, bn_dir = tmp_path / "syncbn", tmp_path / "bn"
    proc = _train([*ONE_STEP, "norm=syncbn", "processes=2", "data.batch=2", f"hydra.run.dir={sync_dir}"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    proc = _train([*ONE_STEP, "norm=bn", "data.batch=4", f"hydra.run.dir={bn_dir}"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    sync, bn = (json.loads((d / "results.json").read_text()) for d in (sync_dir, bn_dir))
    assert sync["status"] == "completed"
    assert (sync["world_size"], sync["batch"], sync["total_batch"], sync["steps"]) == (2, 2, 4, 1)
    assert (bn["world_size"], bn["batch"], bn["total_batch"], bn["steps"]) == (1, 4, 4, 1)
    # After one step every running statistic is (1 - momentum) x init + momentum x that step's
    # batch statistic: equal statistics over the joint batch of 4 give equal buffers.
    got, want = _norm_statistics(sync_dir), _norm_statistics(bn_dir)
    assert set(got) == set(want) and len(got) > 40
    moved = 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
        initial = 0.0 if key.endswith("mean") else 1.0
        moved += int(not torch.allclose(want[key], torch.full_like(want[key], initial)))
    assert moved == len(want)  # every layer saw the step (nothing compared untouched buffers)


@pytest.mark.slow
def test_bn_with_two_processes_differs_from_bn_on_the_joint_batch(tmp_path: Path) -> None:
    """The control: without synchronisation each process normalises with its own two images."""
    proc = _train([*ONE_STEP, "norm=bn", "processes=2", "data.batch=2", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    proc = _train([*ONE_STEP, "norm=bn", "data.batch=4", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two, one = _norm_statistics(tmp_path / "two"), _norm_statistics(tmp_path / "one")
    first = "backbone.body.bn1.running_var"
    assert not torch.allclose(two[first], one[first], rtol=1e-3)


@pytest.mark.slow
def test_a_failing_process_fails_the_job_with_one_line_and_a_results_file(tmp_path: Path) -> None:
    """A configuration error raised in the workers ends the job (exit 2) with its reason."""
    run_dir = tmp_path / "run"
    proc = _train([*ONE_STEP, "processes=2", "data.batch=3", f"hydra.run.dir={run_dir}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "more than the 4 training images" in output and "Traceback" not in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["world_size"] == 2


@pytest.mark.slow
def test_submitit_local_tasks_form_one_ddp_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _train(
        [
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.gpus_per_node=0",
            "norm=syncbn",
            "data.batch=2",
            f"hydra.sweep.dir={sweep}",
            *ONE_STEP,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    job = sweep / "retinanet_tiny" / "syncbn" / "batch_2" / "seed_0"
    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "completed"
    assert (results["world_size"], results["total_batch"], results["steps"]) == (2, 4, 1)
    assert (job / "checkpoints" / "last.rank1.pt").exists()
