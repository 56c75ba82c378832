"""How a job ends, whatever happens: one status in ``results.json``, one exit code, and for jobs of
several processes (``processes=N``) the launch that starts them and the record of a failure that
killed them. ``train.py`` hands in the function that trains one configuration."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from cbn_detect.engine.preflight import RunSkipped
from cbn_detect.engine.signals import TrainingInterrupted
from cbn_detect.results import RESULTS_FILE, Results, completed_results, write_results
from cbn_detect.runtime import (
    ProcessesFailed,
    ProcessesInterrupted,
    configure_process_logging,
    run_processes,
    shutdown,
    started_by_a_launcher,
)
from cbn_detect.runtime.errors import ConfigError, ReportedError, disk_full_cause
from cbn_detect.runtime.lock import JobLocked, release_held
from cbn_detect.voc import DatasetError

log = logging.getLogger("cbn_detect.train")

USER_ERRORS = (ReportedError, DatasetError)
"""Problems the user can act on (a setting, a dataset file, a checkpoint, a full disk): reported in
one line naming the file or setting and the fix, without a traceback, exit code 2. Any other
exception, a ``ValueError`` from inside torch included, is a bug and keeps its traceback (1)."""

_STOP_SIGNALS = {int(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}

RunFunction = Callable[[DictConfig, Path, "str | None"], Results]


@dataclass(frozen=True)
class Outcome:
    """How a job (or one of its processes) ended: its status, the sweep's metric, the exit code."""

    status: str
    metric: float = math.nan
    exit_code: int = 0


def identity(cfg: DictConfig, world_size: int) -> dict[str, object]:
    """The fields of ``results.json`` that say which grid point a job is."""
    return {
        "model": str(cfg.model.name),
        "norm": str(cfg.norm.name),
        "batch": int(cfg.data.batch),
        "world_size": world_size,
        "total_batch": int(cfg.data.batch) * world_size,
        "seed": int(cfg.seed),
        "data": str(cfg.data.name),
    }


def record_ending(
    cfg: DictConfig, run_dir: Path, message: str, status: str = "failed", world_size: int | None = None
) -> None:
    """A job that did not complete still leaves a results.json, so the report lists it instead of
    dropping it: ``error`` says why it failed, ``reason`` why it was skipped. (Rank 0 alone writes:
    the processes of a distributed run share the directory.)"""
    rank, launched = launch_rank_and_world_size()
    if rank != 0:
        return
    why = {"reason": message} if status == "skipped" else {"error": message}
    try:
        write_results(run_dir, Results(status=status, **identity(cfg, world_size or launched), **why))
    except (ReportedError, OSError) as err:  # a full disk, say: the job's own error still gets its line
        log.error("%s; the job's ending (%s) is not recorded", err, status)


SUBMITIT_TASKS = {
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS"),
    "local": ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS"),
}
"""Where the tasks of a submitit job (by ``SUBMITIT_EXECUTOR``) find their rank and count."""


def launch_rank_and_world_size() -> tuple[int, int]:
    """This process's rank and its job's world size as the launcher gave them: torchrun and
    ``processes=N`` set RANK / WORLD_SIZE; the tasks of a submitit job have theirs from the start,
    which matters when the job fails before ``init_distributed`` exports them as RANK / WORLD_SIZE
    (a configuration check); else one process."""
    names = [("RANK", "WORLD_SIZE")]
    if os.environ.get("SUBMITIT_EXECUTOR") in SUBMITIT_TASKS:
        names.append(SUBMITIT_TASKS[os.environ["SUBMITIT_EXECUTOR"]])
    for rank, size in names:
        if os.environ.get(size):
            return int(os.environ.get(rank) or 0), int(os.environ[size])
    return 0, 1


def user_error(err: BaseException) -> str | None:
    """The line that reports ``err`` when the user can act on it, else None (a bug: keep the
    traceback). A :data:`USER_ERRORS` also when Hydra's ``instantiate`` wrapped it (a model or data
    source checking its settings), and any write that failed for lack of space (``metrics.jsonl``,
    say; the atomic writer already raises a :class:`DiskFullError` naming its file)."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, USER_ERRORS):
        return str(err)
    full = disk_full_cause(err)
    if full is not None:
        where = f" while writing {full.filename}" if full.filename else ""
        return f"{full.strerror or 'no space left on device'}{where}; free space and rerun to resume"
    return None


def run_job(run: RunFunction, cfg: DictConfig, run_dir: Path, wandb_group: str | None) -> Outcome:
    """``run`` with every way it can end turned into a status in ``results.json`` and an exit code:
    a skipped norm is not an error (0), a user error is one line (2), anything else keeps its
    traceback (1), an interrupt exits as the signal would (128 + signum). A job another process
    holds (``job.lock``) is left to it: one line, nothing written, the sweep gets NaN (0)."""
    try:
        results = run(cfg, run_dir, wandb_group)
    except JobLocked as err:
        log.warning("%s", err)
        done = completed_results(run_dir, warn=False)
        if done is not None and done.map_voc07 is not None:
            return Outcome("completed", float(done.map_voc07))
        return Outcome("running")
    except RunSkipped as err:
        log.warning("skipped: %s", err)
        record_ending(cfg, run_dir, str(err), status="skipped")
        return Outcome("skipped")
    except TrainingInterrupted as err:
        record_ending(cfg, run_dir, str(err), status="interrupted")
        log.warning("%s", err)
        return Outcome("interrupted", exit_code=128 + err.signum)
    except KeyboardInterrupt:
        message = "interrupted by SIGINT; rerun the same command to resume from the last checkpoint"
        record_ending(cfg, run_dir, message, status="interrupted")
        log.warning("%s", message)
        return Outcome("interrupted", exit_code=128 + signal.SIGINT)
    except Exception as err:
        # The status is recorded first, so that the job's own line is the last one it prints.
        problem = user_error(err)
        if problem is None:
            record_ending(cfg, run_dir, f"{type(err).__name__}: {err}")
            log.exception("the run failed")
            return Outcome("failed", exit_code=1)
        record_ending(cfg, run_dir, problem)
        log.debug("the run failed", exc_info=True)
        log.error("%s", problem)
        return Outcome("failed", exit_code=2)
    finally:
        release_held()
        shutdown()
    metric = math.nan if results.map_voc07 is None else float(results.map_voc07)
    return Outcome(results.status, metric)


def _process_main(
    run: RunFunction, cfg: DictConfig, run_dir: Path, wandb_group: str | None, logging_config: dict | None
) -> Outcome:
    """One of the ``processes=N`` workers. A failing worker exits non-zero, so that the launcher
    stops the others instead of leaving them waiting in a collective."""
    configure_process_logging(logging_config, int(os.environ["RANK"]))
    if cfg.threads is None:  # as torchrun's OMP_NUM_THREADS=1: N processes x all cores thrash the CPU
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    outcome = run_job(run, cfg, run_dir, wandb_group)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)
    return outcome


def _results_written_since(run_dir: Path, start: float) -> bool:
    path = run_dir / RESULTS_FILE
    return path.exists() and path.stat().st_mtime >= start


def launch_job(
    run: RunFunction, cfg: DictConfig, run_dir: Path, wandb_group: str | None, logging_config: dict | None
) -> Outcome:
    """The job as ``processes`` DDP processes on this machine; rank 0's outcome. A job whose
    processes died before rank 0 could say so still gets its results.json here."""
    count = int(cfg.processes)
    start = time.time()
    try:
        return run_processes(count, _process_main, run, cfg, run_dir, wandb_group, logging_config)[0]
    except ProcessesFailed as err:
        codes = set(err.exit_codes.values())
        interrupts = {code for code in codes if code - 128 in _STOP_SIGNALS}
        if interrupts == codes:  # the processes stopped on a signal, checkpointed (one of them sent it on)
            signum = min(interrupts) - 128
            log.warning(
                "the job's processes stopped on %s; rerun the same command to resume", signal.Signals(signum).name
            )
            if not _results_written_since(run_dir, start):
                record_ending(cfg, run_dir, str(err), status="interrupted", world_size=count)
            return Outcome("interrupted", exit_code=128 + signum)
        log.error("%s", err)
        if not _results_written_since(run_dir, start):
            record_ending(cfg, run_dir, str(err), world_size=count)
        return Outcome("failed", exit_code=2 if codes == {2} else 1)
    except ProcessesInterrupted as err:
        log.warning("%s; rerun the same command to resume", err)
        if not _results_written_since(run_dir, start):
            record_ending(cfg, run_dir, str(err), status="interrupted", world_size=count)
        return Outcome("interrupted", exit_code=128 + err.signum)


def launches_processes(cfg: DictConfig) -> bool:
    """Whether this command must start the job's processes itself (``processes`` > 1)."""
    count = int(cfg.processes)
    if count < 1:
        raise ConfigError(f"processes={count} must be at least 1")
    if count > 1 and started_by_a_launcher():
        log.warning("processes=%d ignored: this process was started as one of several (torchrun or SLURM tasks)", count)
        return False
    return count > 1
