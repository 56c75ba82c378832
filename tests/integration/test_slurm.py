"""Sweeps through Hydra's submitit launcher on a real single-node SLURM cluster: one job per grid
point, a job that SLURM warns of its time limit is requeued and resumes from its checkpoint, and a
job of two SLURM tasks trains as one DDP world (and resumes as one after a requeue).

The cluster is brought up by ``slurm_local.sh`` for the session and stopped afterwards, also when a
test fails. Skipped only where SLURM is not installed (CI installs ``slurm-wlm munge`` when apt is
available) or where the daemons cannot be started because we are not root.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cbn_detect.tracking.wandb_reader import wait_for_run
from tests.conftest import REPO, TINY_RUN

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("slurm_local.sh")
SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")

# The node has no GPUs and less memory than the launcher's defaults ask for; one core per job.
SMALL_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.timeout_min=10",
    "threads=1",
]


def _missing_reason() -> str | None:
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for clients of a freshly started cluster; the daemons stop when the session ends.

    Free ports rather than SLURM's defaults, so a cluster already running on this machine is left alone.
    """
    reason = _missing_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    ports = {"SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    start = time.monotonic()
    try:
        up = subprocess.run(
            [str(SCRIPT), "up", str(state)], env={**os.environ, **ports}, capture_output=True, text=True, timeout=120
        )
        if up.returncode != 0:
            logs = "".join(f"\n--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted((state / "log").glob("*.log")))
            pytest.fail(f"slurm_local.sh up failed:\n{up.stderr}{logs}")
        log.info("SLURM up in %.1f s", time.monotonic() - start)
        yield {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf"), "PYTHONPATH": str(REPO)}
    finally:
        subprocess.run([str(SCRIPT), "down", str(state)], capture_output=True, text=True, timeout=120)
        for daemon in ("slurmd", "slurmctld", "munged"):
            assert not (state / "run" / f"{daemon}.pid").exists(), f"{daemon} was not stopped"


def _jobcomp(env: dict[str, str]) -> list[str]:
    """slurmctld's job completion log: one line per finished job, with its final JobState."""
    path = Path(env["SLURM_CONF"]).parents[1] / "log" / "jobcomp.log"
    return path.read_text().splitlines() if path.exists() else []


def _squeue(env: dict[str, str], job: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True
    ).stdout.strip()


def _show_job(env: dict[str, str], job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, check=True).stdout


def _wait(what: str, seconds: float, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_sweep_runs_one_slurm_job_per_grid_point(slurm_env: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    finished_before = len(_jobcomp(slurm_env))
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbn_detect.train",
            "-m",
            "norm=bn,none",
            f"hydra.sweep.dir={sweep}",
            *SMALL_JOBS,
            *TINY_RUN,
        ],
        cwd=tmp_path,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log.info("sweep through SLURM took %.1f s", time.monotonic() - start)
    assert proc.returncode == 0, proc.stderr[-3000:]

    for norm in ("bn", "none"):
        results = json.loads((sweep / "retinanet_tiny" / norm / "batch_4" / "seed_0" / "results.json").read_text())
        assert results["status"] == "completed" and results["norm"] == norm and results["steps"] == 8

    # One SLURM array with one task per grid point: .submitit/<array>_<task>/ holds each task's logs.
    submitit = sweep / ".submitit"
    tasks = sorted(p.name for p in submitit.iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    array_id = tasks[0].split("_")[0]
    assert tasks == [f"{array_id}_0", f"{array_id}_1"], tasks
    for task in tasks:
        logs = "".join(f.read_text() for f in (submitit / task).glob("*_log.*"))
        assert f"JobEnvironment(job_id={task}," in logs and "Job completed successfully" in logs
    batch_script = (submitit / array_id / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%" in batch_script and "#SBATCH --cpus-per-task=1" in batch_script
    assert "--gpus-per-node" not in batch_script and "#SBATCH --signal=USR2@120" in batch_script

    # slurmctld's own records: both tasks of the array finished as COMPLETED.
    _wait("the job completion records", 30, lambda: len(_jobcomp(slurm_env)) >= finished_before + 2)
    states = [re.search(r"JobState=(\S+)", line).group(1) for line in _jobcomp(slurm_env)[finished_before:]]
    assert states == ["COMPLETED", "COMPLETED"], states
    shown = subprocess.run(
        ["scontrol", "show", "job", array_id], env=slurm_env, capture_output=True, text=True, check=True
    ).stdout
    assert shown.count("JobState=COMPLETED") == 2 and f"ArrayJobId={array_id}" in shown


@pytest.mark.slow
def test_a_job_at_its_time_limit_is_requeued_and_resumes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """SLURM's warning signal -> submitit requeues the job -> train.resume=auto continues where it stopped.

    The signal is what SLURM sends signal_delay_s before the time limit (``--signal=USR2@120``), as
    submitit's own ``Job._interrupt(timeout=True)`` sends it.
    """
    sweep = tmp_path / "sweep"
    job_dir = sweep / "retinanet_tiny" / "bn" / "batch_4" / "seed_0"
    sweep_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cbn_detect.train",
            "-m",
            "norm=bn",
            f"hydra.sweep.dir={sweep}",
            *SMALL_JOBS,
            *TINY_RUN,
            "train.epochs=6",
        ],
        cwd=tmp_path,
        env=slurm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait("the first checkpoint", 180, lambda: (job_dir / "checkpoints" / "last.pt").exists())
        (task,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]  # one job: no array
        subprocess.run(["scancel", "--signal=USR2", task], env=slurm_env, check=True)
        # SLURM holds a requeued batch job for a while (BeginTime); release it at once for the test.
        _wait("the requeue", 60, lambda: "BeginTime" in _squeue(slurm_env, task))
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], env=slurm_env, check=True)
        output, _ = sweep_proc.communicate(timeout=300)
    finally:
        sweep_proc.kill()
    assert sweep_proc.returncode == 0, output[-3000:]

    logs = "".join(f.read_text() for f in (sweep / ".submitit" / task).glob("*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Calling checkpoint method" in logs
    assert "resumed from" in (job_dir / "train.log").read_text()
    _wait("the job to complete", 60, lambda: "JobState=COMPLETED" in _show_job(slurm_env, task))
    assert "Restarts=1" in _show_job(slurm_env, task)
    results = json.loads((job_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 6 * 4 and results["epochs"] == 6
    steps = [
        json.loads(line)["step"] for line in (job_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert steps == list(range(1, 25))


@pytest.mark.slow
def test_a_ddp_job_over_two_slurm_tasks_is_requeued_and_resumes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """Two SLURM tasks of one job form one gloo DDP world (SyncBN across them); requeued by SLURM's
    time-limit warning, both tasks resume from their own checkpoints of the same step."""
    sweep = tmp_path / "sweep"
    job_dir = sweep / "retinanet_tiny" / "syncbn" / "batch_4" / "seed_0"
    epochs = 10
    sweep_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cbn_detect.train",
            "-m",
            "norm=syncbn",
            f"hydra.sweep.dir={sweep}",
            *SMALL_JOBS,
            "hydra.launcher.tasks_per_node=2",
            *TINY_RUN,
            f"train.epochs={epochs}",
            "eval.coco=false",
        ],
        cwd=tmp_path,
        env=slurm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait("the first checkpoint", 240, lambda: (job_dir / "checkpoints" / "last.pt").exists())
        (task,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
        subprocess.run(["scancel", "--signal=USR2", task], env=slurm_env, check=True)
        _wait("the requeue", 90, lambda: "BeginTime" in _squeue(slurm_env, task))
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], env=slurm_env, check=True)
        output, _ = sweep_proc.communicate(timeout=400)
    finally:
        sweep_proc.kill()
    assert sweep_proc.returncode == 0, output[-3000:]

    batch_script = (sweep / ".submitit" / task / f"{task}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in batch_script and "#SBATCH --cpus-per-task=1" in batch_script
    logs = "".join(f.read_text() for f in (sweep / ".submitit" / task).glob("*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Calling checkpoint method" in logs
    assert "resumed from" in (job_dir / "train.log").read_text()
    # The sweep has its result as soon as rank 0 wrote it; the job ends once both tasks have exited.
    _wait("the job to complete", 60, lambda: "JobState=COMPLETED" in _show_job(slurm_env, task))
    shown = _show_job(slurm_env, task)
    assert "Restarts=1" in shown and "NumTasks=2" in shown, shown

    results = json.loads((job_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["norm"] == "syncbn"
    assert (results["world_size"], results["batch"], results["total_batch"]) == (2, 4, 8)
    assert results["steps"] == epochs * 16 // 8 and results["epochs"] == epochs  # 16 images, 8 per step
    assert (job_dir / "checkpoints" / "last.rank1.pt").exists()  # each process resumed its own
    steps = [
        json.loads(line)["step"] for line in (job_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert steps == list(range(1, results["steps"] + 1))
    assert not (job_dir / "job.lock").exists()

    # W&B: the part before the requeue was finished before submitit's handler ended the process,
    # and the resumed part continues the same run id; together they hold every step once.
    kept_id = (job_dir / "wandb" / "run_id").read_text().strip()
    run = wait_for_run(job_dir / "wandb")
    assert run.run_id == kept_id and len(run.files) == 2 and run.exit_code == 0
    assert run.part_exit_codes[0] == 128 + signal.SIGUSR2
    assert [row["_step"] for row in run.history if "loss" in row] == steps
