"""Reading a sweep: its job folders, each job's ``results.json`` (through :mod:`cbn_detect.results`)
as one typed :class:`JobResult`, and the loss curve and schedule of a job for the figures.

Every folder holding ``.hydra/`` is a job, finished or not: a job without ``results.json`` is
``unfinished``, one whose file cannot be read ``unreadable`` (the file named), and one that did not
complete but whose ``job.lock`` is alive ``running`` (its holder named), so that no job is dropped
from the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cbn_detect.results import Results, UnreadableResults, read_results
from cbn_detect.runtime.iterations import lr_decay_steps, resolve_iterations
from cbn_detect.runtime.lock import read_holder, stale_reason

log = logging.getLogger(__name__)

BASELINE_NORM = "bn"
"""The norm every other norm is paired with, and drawn first."""

NESTED_COLUMNS = {
    "coco_ap50": ("coco", "AP50"),
    "fps_model": ("fps", "fps_model"),
    "fps_consistent": ("fps", "consistent"),
}
""":class:`JobResult` fields lifted out of results.json's nested fields: field -> (results field, key inside it)."""

Cell = tuple[str, str, int]
"""(model, norm, images per process): the jobs of a cell differ only by their seed (and world size)."""


@dataclass(frozen=True)
class JobResult:
    """One job of a sweep as the report reads it: the numbers of its ``results.json`` that the report
    shows, where its folder is (relative to the sweep) and what state it is in. A number that is not
    finite is None, as in the file. Every field but ``job_dir`` is a field of
    :class:`cbn_detect.results.Results` or lifted out of one (:data:`NESTED_COLUMNS`)."""

    job_dir: str
    status: str | None
    """A results.json status, or ``unfinished``, ``unreadable``, ``running``."""
    model: str | None = None
    norm: str | None = None
    batch: int | None = None
    """Images per process."""
    world_size: int | None = None
    total_batch: int | None = None
    seed: int | None = None
    reason: str | None = None
    error: str | None = None
    map_voc07: float | None = None
    map_area: float | None = None
    coco_ap50: float | None = None
    fps_model: float | None = None
    fps_consistent: bool | None = None
    """False: the end-to-end FPS came out above the model-only one, so the timing was disturbed."""
    loss_variance: float | None = None
    train_time_s: float | None = None
    steps: int | None = None
    """Training iterations per process, which the schedule's fractions refer to."""

    @classmethod
    def from_results(cls, job_dir: str, results: Results) -> JobResult:
        values = {name: getattr(results, name) for name in _RESULTS_FIELDS}
        values |= {key: (getattr(results, field) or {}).get(inner) for key, (field, inner) in NESTED_COLUMNS.items()}
        return cls(job_dir, **{name: _finite_or_none(value) for name, value in values.items()})

    @property
    def cell(self) -> Cell:
        return str(self.model), str(self.norm), int(self.batch or 0)

    @property
    def completed(self) -> bool:
        return self.status == "completed"


_RESULTS_FIELDS = tuple(f.name for f in dataclasses.fields(JobResult) if f.name not in {"job_dir", *NESTED_COLUMNS})


def _finite_or_none(value: Any) -> Any:
    """A non-finite number as None: how results.json writes it, and how every reader takes it."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The newest sweep under ``root``: Hydra writes ``multirun.yaml`` at the top of every sweep."""
    sweeps = [p.parent for p in root.glob("**/multirun.yaml")]
    if not sweeps:
        raise FileNotFoundError(f"no sweep found under {root.resolve()}; pass the sweep directory explicitly")
    return max(sweeps, key=lambda p: (p / "multirun.yaml").stat().st_mtime)


def collect_runs(sweep_dir: Path) -> list[JobResult]:
    """One row per job directory (a folder holding ``.hydra/``), finished or not, in path order."""
    return [_read_job(hydra_dir.parent, sweep_dir) for hydra_dir in sorted(sweep_dir.glob("**/.hydra"))]


def _read_job(job_dir: Path, sweep_dir: Path) -> JobResult:
    config = job_dir / ".hydra" / "config.yaml"
    job = _read_results(job_dir, str(job_dir.relative_to(sweep_dir)), config)
    holder = read_holder(job_dir)  # a live job.lock: a process is training it (again) right now
    if holder is not None and not job.completed and stale_reason(holder, _lock_stale_h(config) * 3600) is None:
        return dataclasses.replace(job, status="running", reason=f"held by {holder.describe()}")
    return job


def _read_results(job_dir: Path, name: str, config: Path) -> JobResult:
    """The job as its results.json says; without one (or with one that cannot be read), its
    identity from the job's config."""
    try:
        found = read_results(job_dir)
    except UnreadableResults as err:
        log.warning("%s; listing the job as unreadable", err)
        return JobResult(name, "unreadable", **_identity_from_config(config), error=f"{err}; rerun the job to redo it")
    if found is None:
        return JobResult(name, "unfinished", **_identity_from_config(config))
    return JobResult.from_results(name, found)


def _identity_from_config(config_path: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(config_path)
    return {
        "model": OmegaConf.select(cfg, "model.name"),
        "norm": OmegaConf.select(cfg, "norm.name"),
        "batch": OmegaConf.select(cfg, "data.batch"),
        "seed": OmegaConf.select(cfg, "seed"),
    }


def _lock_stale_h(config_path: Path) -> float:
    return float(OmegaConf.select(OmegaConf.load(config_path), "train.lock_stale_h", default=6.0))


def cells(rows: Iterable[JobResult]) -> dict[Cell, list[JobResult]]:
    """The jobs of each (model, norm, batch) cell, cells in sorted order."""
    groups: dict[Cell, list[JobResult]] = defaultdict(list)
    for row in rows:
        groups[row.cell].append(row)
    return dict(sorted(groups.items()))


def completed(rows: Iterable[JobResult]) -> list[JobResult]:
    return [row for row in rows if row.completed]


def norm_order(norms: Sequence[str]) -> list[str]:
    """The baseline first, then the others by name."""
    return sorted(norms, key=lambda norm: (norm != BASELINE_NORM, norm))


def load_loss_curve(metrics_path: Path) -> tuple[list[int], list[float]]:
    """(steps, training losses) from ``metrics.jsonl``, in step order, one point per step.

    The trainer writes every step's loss (``step_loss``), not only the ``train.log_every`` steps'
    full records, so the curve has every step up to the last one; a file of an older trainer has
    only the logged steps' ``loss``, which is used where no ``step_loss`` is. A non-finite loss
    (null) is NaN, a visible gap; a line cut short by a kill is skipped; a step written twice keeps
    its last value (a resume cuts the file back to its checkpoint, so this does not happen in a
    run's own file).
    """
    logged: dict[int, float] = {}
    per_step: dict[int, float] = {}
    if not metrics_path.exists():
        return [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("step") is None:
            continue
        for key, into in (("loss", logged), ("step_loss", per_step)):
            if key in record:
                into[int(record["step"])] = math.nan if record[key] is None else float(record[key])
    curve = {**logged, **per_step}
    steps = sorted(curve)
    return steps, [curve[step] for step in steps]


@dataclass(frozen=True)
class ScheduleMarks:
    """Where a run's training changed regime, in steps (a mark at ``n``: the first ``n`` steps ran
    before the change): the end of CBN's plain-BN burn-in (None: the norm has none, or it is 0)
    and the steps where the lr schedule multiplied the lr by gamma."""

    burnin: int | None = None
    lr_decays: tuple[int, ...] = ()


def schedule_marks(job_dir: Path, steps: Any) -> ScheduleMarks:
    """The burn-in end and lr decays of the job in ``job_dir``, from its saved ``.hydra/config.yaml``
    and its training iterations per process ``steps`` (results.json), computed by the functions
    the run itself used (``resolve_iterations``, ``lr_decay_steps``), so a mark sits where the change
    happened. Nothing without ``steps``; a config that cannot be read is a warning, not a failure."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        return ScheduleMarks()
    try:
        cfg = OmegaConf.load(Path(job_dir) / ".hydra" / "config.yaml")
        burnin = OmegaConf.select(cfg, "norm.burnin")
        burnin = resolve_iterations("norm.burnin", burnin, steps) if burnin is not None else None
        optim = OmegaConf.select(cfg, "optim")
        decays = lr_decay_steps(optim, steps) if optim is not None and "schedule" in optim else []
    except Exception as err:  # noqa: BLE001 - a mark that cannot be placed must not cost the report
        log.warning("%s: no burn-in or lr decay marks (%s: %s)", job_dir, type(err).__name__, err)
        return ScheduleMarks()
    return ScheduleMarks(burnin or None, tuple(sorted(set(decays))))
