"""How a job ends, whatever happens: one status in ``results.json``, one exit code, and for jobs of
several processes (``processes=N``) the launch that starts them and the record of a failure that
killed them. ``train.py`` hands in the function that trains one configuration."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from cbn_detect.engine.preflight import RunSkipped
from cbn_detect.engine.signals import TrainingInterrupted
from cbn_detect.results import RESULTS_FILE, Results, write_results
from cbn_detect.runtime import (
    ProcessesFailed,
    ProcessesInterrupted,
    configure_process_logging,
    run_processes,
    shutdown,
    started_by_a_launcher,
)
from cbn_detect.voc import DatasetError

log = logging.getLogger("cbn_detect.train")

USER_ERRORS = (DatasetError, ValueError)
"""Mistakes in the configuration or the data: reported in one line, without a traceback."""

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
    if os.environ.get("RANK", "0") != "0":
        return
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    why = {"reason": message} if status == "skipped" else {"error": message}
    write_results(run_dir, Results(status=status, **identity(cfg, world_size), **why))


def run_job(run: RunFunction, cfg: DictConfig, run_dir: Path, wandb_group: str | None) -> Outcome:
    """``run`` with every way it can end turned into a status in ``results.json`` and an exit code:
    a skipped norm is not an error (0), a user error is one line (2), anything else keeps its
    traceback (1), an interrupt exits as the signal would (128 + signum)."""
    try:
        results = run(cfg, run_dir, wandb_group)
    except RunSkipped as err:
        log.warning("skipped: %s", err)
        record_ending(cfg, run_dir, str(err), status="skipped")
        return Outcome("skipped")
    except TrainingInterrupted as err:
        log.warning("%s", err)
        record_ending(cfg, run_dir, str(err), status="interrupted")
        return Outcome("interrupted", exit_code=128 + err.signum)
    except USER_ERRORS as err:
        log.error("%s", err)
        record_ending(cfg, run_dir, str(err))
        return Outcome("failed", exit_code=2)
    except Exception as err:
        log.exception("the run failed")
        record_ending(cfg, run_dir, f"{type(err).__name__}: {err}")
        return Outcome("failed", exit_code=1)
    finally:
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
        log.error("%s", err)
        if not _results_written_since(run_dir, start):
            record_ending(cfg, run_dir, str(err), world_size=count)
        return Outcome("failed", exit_code=2 if set(err.exit_codes.values()) == {2} else 1)
    except ProcessesInterrupted as err:
        log.warning("%s; rerun the same command to resume", err)
        if not _results_written_since(run_dir, start):
            record_ending(cfg, run_dir, str(err), status="interrupted", world_size=count)
        return Outcome("interrupted", exit_code=128 + err.signum)


def launches_processes(cfg: DictConfig) -> bool:
    """Whether this command must start the job's processes itself (``processes`` > 1)."""
    count = int(cfg.processes)
    if count < 1:
        raise ValueError(f"processes={count} must be at least 1")
    if count > 1 and started_by_a_launcher():
        log.warning("processes=%d ignored: this process was started as one of several (torchrun or SLURM tasks)", count)
        return False
    return count > 1
