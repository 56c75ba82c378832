"""``python -m cbn_detect.bench profile``: where a short training run's wall time goes, phase by phase.

It runs one real job through the code ``python -m cbn_detect.train`` runs (``train.run``: setup,
training, final evaluation and FPS, results files; ``processes=N`` started by the same launcher),
with a :class:`~cbn_detect.runtime.phases.PhaseTimer` installed, and prints each phase's seconds
and share of the wall time: data loading (waiting on the loader), forward, loss, backward,
optimizer, the processes' per-step agreement, norm rollback, diagnostics, logging/sinks,
checkpoints, evaluation, FPS, setup, the start of a job's processes, and ``other`` (the wall time
no phase claims).

The job is the configured one (Hydra overrides as for ``cbn_detect.train``) shortened to one epoch,
trained from scratch in a temporary folder; ``train.epochs=12`` profiles a whole demo job. In a job
of several processes the phases are rank 0's; a collective (the step's loss agreement, DDP's
gradient all-reduce) charges the waiting for the slower process to the phase it sits in. On a GPU
every phase edge synchronises the device, so kernels are charged where they were queued.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cbn_detect import train
from cbn_detect.jobs import Outcome, launch_job, launch_rank_and_world_size, launches_processes, run_job
from cbn_detect.results import RESULTS_FILE, Results
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.io import write_json
from cbn_detect.runtime.phases import PhaseTimer, timing

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
TIMINGS_FILE = "profile_timings.json"

PHASES: dict[str, str] = {
    "setup": "process group, data, model, optimizer, checkpoint lookup",
    "data": "waiting on the loader's next batch, copy to the device",
    "forward": "the model's training forward (transform, backbone, head, anchors)",
    "loss": "target assignment and losses (inside the model's forward)",
    "sync": "the step's loss agreement: an all-reduce, waiting for the slowest process",
    "backward": "backward (DDP's gradient all-reduce included)",
    "optimizer": "zero_grad, clipping, optimizer and LR schedule steps",
    "rollback": "saving norm statistics and CBN history for a skipped step",
    "diagnostics": "gradient, update and norm statistics (diagnostics.every)",
    "logging": "sinks (metrics.jsonl, console, W&B set-up/close), progress, results files",
    "checkpoint": "checkpoints/last.pt after each epoch",
    "evaluation": "VOC/COCO evaluation (folded model), periodic and final",
    "fps": "the batch-1 FPS measurement",
    "launch": "starting the job's processes (processes>1) and ending them",
}
"""Every phase of the table, in its order, and what it holds. Phases are exclusive: W&B's set-up is
logging, not setup; RetinaNet's loss runs inside its forward but is counted as loss alone."""

SHORT = ("train.epochs=1", "train.resume=never")
"""What every profile changes in the job: one epoch, from scratch (explicit overrides win)."""

TINY = (
    "data.source.num_train=16",
    "data.source.num_val=4",
    "data.source.num_test=8",
    "data.source.image_size=64",
    "model.min_size=64",
    "model.max_size=64",
    "data.batch=4",
    "train.log_every=1",
    "diagnostics.every=2",
    "eval.fps_images=2",
    "eval.fps_warmup=1",
    "eval.log_images=1",
    "device=cpu",
)
"""``--tiny``: a CPU job of a few seconds on 16 synthetic 64 px images (what the tests run)."""

LOGGING: dict[str, Any] = {
    "version": 1,
    "formatters": {"simple": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["console"]},
    "disable_existing_loggers": False,
}
"""The job's log on stderr (rank 0's, as ``cbn_detect.train`` shows it), so stdout holds the table."""


def merged_overrides(*groups: tuple[str, ...] | list[str]) -> list[str]:
    """The overrides of all ``groups``, a later one replacing an earlier one of the same key
    (Hydra refuses two values for one config group)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged[override.split("=", 1)[0]] = override
    return list(merged.values())


def compose_job(overrides: list[str]) -> DictConfig:
    """The job's configuration, composed from ``conf/`` as ``cbn_detect.train`` composes it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def profiled_run(cfg: DictConfig, run_dir: Path, wandb_group: str | None) -> Results:
    """``train.run`` under a phase timer; rank 0 leaves its timings in ``run_dir``. A module-level
    function, so that a job's spawned processes can run it."""
    timer = PhaseTimer()
    start = time.perf_counter()
    with timing(timer):
        results = train.run(cfg, run_dir, wandb_group)
    wall = time.perf_counter() - start
    if launch_rank_and_world_size()[0] == 0:
        write_json(run_dir / TIMINGS_FILE, {"wall_s": wall, "phases": timer.totals()})
    return results


def run_profiled_job(cfg: DictConfig, run_dir: Path) -> tuple[Outcome, float]:
    """How the job ended and its wall seconds, run as ``cbn_detect.train`` runs it: in this process
    or as ``processes`` spawned ones."""
    start = time.perf_counter()
    if launches_processes(cfg):
        outcome = launch_job(profiled_run, cfg, run_dir, None, LOGGING)
    else:
        outcome = run_job(profiled_run, cfg, run_dir, None)
    return outcome, time.perf_counter() - start


def phase_rows(timings: dict[str, Any], wall: float) -> list[tuple[str, float, float, int]]:
    """(phase, seconds, share of ``wall`` in %, entries) for every phase of :data:`PHASES` (zero
    when never entered), then any other phase measured, then ``other``: the wall time no phase
    claims (never negative, as phases are exclusive and inside the wall)."""
    measured = dict(timings["phases"])
    measured["launch"] = {"seconds": max(0.0, wall - timings["wall_s"]), "count": 1 if wall > timings["wall_s"] else 0}
    names = list(PHASES) + sorted(set(measured) - set(PHASES))
    rows = [(n, measured.get(n, {}).get("seconds", 0.0), int(measured.get(n, {}).get("count", 0))) for n in names]
    other = max(0.0, wall - sum(seconds for _, seconds, _ in rows))
    rows.append(("other", other, 0))
    return [(name, seconds, 100.0 * seconds / wall, count) for name, seconds, count in rows]


def describe_job(cfg: DictConfig, results: dict[str, Any]) -> str:
    """The header's account of what was run: the job, its size, the machine."""
    threads = f"{cfg.threads} thread(s)" if cfg.threads is not None else "torch's default threads"
    return (
        f"{cfg.model.name} with {cfg.norm.name}, batch {cfg.data.batch} x {cfg.processes} process(es) "
        f"x {threads}, {cfg.data.name} data, {results.get('epochs')} epoch(s) = {results.get('steps')} "
        f"steps, device {results.get('device')}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )


def format_table(rows: list[tuple[str, float, float, int]], wall: float, described: str) -> str:
    lines = [
        f"# profile: {described}; wall {wall:.1f} s",
        f"{'phase':<12}{'seconds':>10}{'share':>9}{'calls':>8}  what",
    ]
    for name, seconds, share, count in rows:
        what = PHASES.get(name, "wall time no phase claims" if name == "other" else "")
        lines.append(f"{name:<12}{seconds:>10.2f}{share:>8.1f}%{count:>8}  {what}")
    lines.append(f"{'total':<12}{wall:>10.2f}{sum(r[2] for r in rows):>8.1f}%")
    return "\n".join(lines)


def as_json(rows: list[tuple[str, float, float, int]], wall: float, described: str, overrides: list[str]) -> dict:
    return {
        "job": described,
        "overrides": overrides,
        "wall_s": wall,
        "phases": {name: {"seconds": s, "share_pct": share, "calls": n} for name, s, share, n in rows},
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cbn_detect.bench profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the job, as for cbn_detect.train")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers there")
    p.add_argument("--run-dir", type=Path, default=None, help="the job's folder, kept (default: a temporary one)")
    p.add_argument("--tiny", action="store_true", help=f"CPU preset, explicit overrides win: {' '.join(TINY)}")
    return p.parse_args(argv)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.config.dictConfig(LOGGING)
    overrides = merged_overrides(SHORT, TINY if args.tiny else (), args.overrides)
    try:
        cfg = compose_job(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="cbn_detect_profile_"))
    try:
        outcome, wall = run_profiled_job(cfg, run_dir)
        if outcome.status != "completed":
            print(f"the profiled job ended {outcome.status}; its log above says why", file=sys.stderr)
            return outcome.exit_code or 1
        timings = json.loads((run_dir / TIMINGS_FILE).read_text())
        results = json.loads((run_dir / RESULTS_FILE).read_text())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    rows = phase_rows(timings, wall)
    described = describe_job(cfg, results)
    print(format_table(rows, wall, described))
    if args.json is not None:
        write_json(args.json, as_json(rows, wall, described, overrides))
    return 0
