"""One writer per job directory: two sweeps into one folder train every job once; a lock whose
holder is gone (dead pid, requeued SLURM job, silent other host) is taken over; the report shows a
held job as running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cbn_detect.report import collect_runs
from cbn_detect.runtime import DistInfo
from cbn_detect.runtime.lock import (
    LOCK_FILE,
    Holder,
    JobLocked,
    claim_job,
    process_start,
    read_holder,
    stale_reason,
    try_acquire,
)
from tests.conftest import REPO, TINY_RUN

HOUR = 3600.0


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen]:
    """A live process on this host that is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(run_dir: Path, holder: Holder, age_s: float = 0.0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_bytes(holder.content())
    when = time.time() - age_s
    os.utime(path, (when, when))


def held_by(pid: int, **changes: object) -> Holder:
    return replace(Holder.this_process(), **{"pid": pid, "pid_start": process_start(pid), **changes})


def test_the_lock_file_names_its_holder_and_goes_away_on_release(tmp_path: Path) -> None:
    lock, holder = try_acquire(tmp_path, 6 * HOUR)
    assert lock is not None and holder is None
    raw = json.loads((tmp_path / LOCK_FILE).read_text())
    assert raw["pid"] == os.getpid() and raw["host"] and raw["slurm_job"] is None and raw["started"] > 0
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path: Path, other_process: subprocess.Popen) -> None:
    write_lock(tmp_path, held_by(other_process.pid), age_s=100 * HOUR)  # age does not matter on this host
    lock, holder = try_acquire(tmp_path, 6 * HOUR)
    assert lock is None and holder is not None and holder.pid == other_process.pid
    with pytest.raises(JobLocked, match=rf"being trained by pid {other_process.pid} on "):
        claim_job(tmp_path, DistInfo(), 6.0)
    assert read_holder(tmp_path).pid == other_process.pid


def test_a_dead_pid_on_this_host_is_stale_and_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, held_by(dead.pid, pid_start=None))
    assert stale_reason(read_holder(tmp_path), 6 * HOUR) == f"its process (pid {dead.pid}) is gone"
    lock = claim_job(tmp_path, DistInfo(), 6.0)
    assert lock is not None and read_holder(tmp_path).pid == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path: Path, other_process: subprocess.Popen) -> None:
    write_lock(tmp_path, held_by(other_process.pid, pid_start=process_start(other_process.pid) - 1))
    assert "is gone" in stale_reason(read_holder(tmp_path), 6 * HOUR)


def test_another_hosts_lock_is_stale_only_after_the_age_limit(tmp_path: Path) -> None:
    elsewhere = held_by(1, host="node-elsewhere", pid_start=None)
    write_lock(tmp_path, elsewhere, age_s=5 * HOUR)
    assert stale_reason(read_holder(tmp_path), 6 * HOUR) is None
    with pytest.raises(JobLocked, match=r"pid 1 on node-elsewhere since .*, refreshed 5\.0 h ago"):
        claim_job(tmp_path, DistInfo(), 6.0)
    write_lock(tmp_path, elsewhere, age_s=7 * HOUR)
    assert "not refreshed for 7.00 h" in stale_reason(read_holder(tmp_path), 6 * HOUR)
    lock = claim_job(tmp_path, DistInfo(), 6.0)
    assert lock is not None and read_holder(tmp_path).host != "node-elsewhere"
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1230")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    before_requeue = held_by(1, host="node-elsewhere", pid_start=None, slurm_job="1230_4")
    write_lock(tmp_path, before_requeue, age_s=60)
    assert stale_reason(read_holder(tmp_path), 6 * HOUR) == "it belongs to this SLURM job (1230_4), requeued"
    write_lock(tmp_path, replace(before_requeue, slurm_job="1230_5"), age_s=60)  # another task of the array
    assert stale_reason(read_holder(tmp_path), 6 * HOUR) is None
    write_lock(tmp_path, before_requeue, age_s=60)
    lock = claim_job(tmp_path, DistInfo(), 6.0)
    assert lock is not None and read_holder(tmp_path).slurm_job == "1230_4" and read_holder(tmp_path).pid == os.getpid()
    lock.release()


def test_a_lock_without_content_is_held_for_a_minute(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_bytes(b"")
    assert stale_reason(read_holder(tmp_path), 6 * HOUR) is None
    assert "unknown process" in read_holder(tmp_path).describe()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_FILE, (old, old))
    assert "no content" in stale_reason(read_holder(tmp_path), 6 * HOUR)


def test_a_job_completed_meanwhile_is_not_started_again(tmp_path: Path) -> None:
    with pytest.raises(JobLocked, match="completed it just now"):
        claim_job(tmp_path, DistInfo(), 6.0, finished=lambda: True)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_that_lost_its_lock_stops_and_leaves_the_successor_alone(tmp_path: Path) -> None:
    lock = claim_job(tmp_path, DistInfo(), 6.0)
    assert lock is not None
    lock.refresh()  # still ours
    successor = held_by(1, host="node-elsewhere", pid_start=None)
    write_lock(tmp_path, successor)  # took it over, judging ours stale
    with pytest.raises(JobLocked, match="taken over by pid 1 on node-elsewhere"):
        lock.refresh()
    lock.release()
    assert read_holder(tmp_path).token == successor.token


def test_the_report_shows_a_held_job_as_running_with_its_holder(
    tmp_path: Path, other_process: subprocess.Popen
) -> None:
    for seed in (0, 1):
        job = tmp_path / f"seed_{seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(
            f"model: {{name: m}}\nnorm: {{name: bn}}\ndata: {{batch: 2}}\nseed: {seed}\ntrain: {{lock_stale_h: 6}}\n"
        )
    write_lock(tmp_path / "seed_0", held_by(other_process.pid))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "seed_1", held_by(dead.pid, pid_start=None))
    rows = {row.job_dir: row for row in collect_runs(tmp_path)}
    assert rows["seed_0"].status == "running"
    assert rows["seed_0"].reason.startswith(f"held by pid {other_process.pid} on ")
    assert rows["seed_1"].status == "unfinished"  # its holder died: nobody is running it


def _sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_sweeps_into_one_folder_train_every_job_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "norm=bn,none", f"hydra.sweep.dir={sweep}", *TINY_RUN, "eval.coco=false", "diagnostics.level=off"]
    procs = [_sweep(args, tmp_path), _sweep(args, tmp_path)]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    skipped_held = sum(len(re.findall(r"skipping \S+: it is being trained by pid \d+ on ", o)) for o in outputs)
    skipped_done = sum(o.count("already holds a completed run") + o.count("completed it just now") for o in outputs)
    assert skipped_held >= 1 and skipped_held + skipped_done == 2, "\n".join(outputs)

    for norm in ("bn", "none"):
        job = sweep / "retinanet_tiny" / norm / "batch_4" / "seed_0"
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["steps"] == 8
        records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert Counter(r["step"] for r in records if "loss" in r) == Counter(range(1, 9))
        assert [r["step"] for r in records if "eval/map_voc07" in r] == [8]
        assert (job / "train.log").read_text().count("epoch 2/2 done") == 1  # both processes log here
        assert not (job / LOCK_FILE).exists()


def test_every_rank_of_a_distributed_job_skips_a_held_job(tmp_path: Path, other_process: subprocess.Popen) -> None:
    """Rank 0 decides and broadcasts: no rank trains, none waits in a collective for one that skipped."""
    job = tmp_path / "job"
    write_lock(job, held_by(other_process.pid))
    proc = _sweep([f"hydra.run.dir={job}", "processes=2", *TINY_RUN], tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"it is being trained by pid {other_process.pid}" in output
    assert not (job / "results.json").exists() and not (job / "metrics.jsonl").exists()
    assert read_holder(job).pid == other_process.pid
