"""Compare the runs of a sweep: ``python -m cbn_detect.report [<sweep_dir>]``.

Reads every job's ``results.json`` (and notices job directories without one), prints a table of
model x norm x batch (images per process) with n and mean +- std over seeds, then each norm's
paired difference to BN in VOC07 mAP with a 95% t-interval over seeds, and writes both into
``report.md`` (and every job into ``results.csv``) in the sweep directory. Failed, diverged,
skipped, unfinished and running jobs (a live ``job.lock``, its holder named) and jobs whose
``results.json`` cannot be read (``unreadable``, the file named) are listed as such, never dropped.
The statistics live in ``cbn_detect.stats``; this module reads runs, lays out tables and draws.

It also draws the study's figures into the sweep directory, embedded in ``report.md``:
``map_vs_batch.png`` (the headline: how detection quality holds up as the images per process shrink),
``loss_curves.png`` (every training step's loss per norm at each batch size, from ``metrics.jsonl``,
with CBN's burn-in end and the lr decays marked) and ``loss_variance.png`` (how noisy training is per
norm). A grid point without a completed run is drawn as a cross on the axis, and a run that did not
complete as a dashed loss curve; a point of a single seed has no error bar. The figures' titles
name only the marks they hold.

Per model and batch, ``detections_<model>_b<batch>.png`` shows what the numbers mean: the same few
test images with their ground truth, then one row per norm with the detections of its seed-0 job
(else its first completed one), read from the job's devkit files; no model is loaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cbn_detect import stats
from cbn_detect.evaluation.pictures import (
    DEFAULT_IMAGES,
    DEFAULT_SCORE,
    Drawing,
    SplitData,
    draw_detections,
    draw_ground_truth,
    job_test_split,
    load_examples,
    pick_images,
)
from cbn_detect.results import UnreadableResults, read_results
from cbn_detect.runtime import io
from cbn_detect.runtime.iterations import lr_decay_steps, resolve_iterations
from cbn_detect.runtime.lock import read_holder, stale_reason

log = logging.getLogger(__name__)

BASELINE_NORM = "bn"
HEADLINE_METRIC = "map_voc07"

FIGURES: tuple[tuple[str, str], ...] = (
    ("map_vs_batch.png", "VOC07 mAP against images per process"),
    ("loss_curves.png", "Training loss per norm at each batch size"),
    ("loss_variance.png", "Training loss variance (last epoch) per norm"),
)

# Row keys: fields of results.json (cbn_detect.results) or the nested numbers _flatten lifts out.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("map_voc07", "VOC07 mAP"),
    ("map_area", "area mAP"),
    ("coco_ap50", "COCO AP50"),
    ("fps_model", "FPS"),
    ("loss_variance", "loss var"),
    ("train_time_s", "train s"),
)

SUMMARY_NOTE = (
    "One row per (model, norm, images per process): `procs` is the world size and `total batch` = "
    "batch x procs, taken from the completed runs; `n` is the number of completed seeds and each number "
    "is their mean ± sample standard deviation (ddof = 1; a single value when n = 1); `runs` counts the "
    "cell's jobs by status."
)

DISTURBED_FPS_NOTE = (
    "These jobs measured an end-to-end FPS above their model-only FPS, although end-to-end does more work: "
    "another process was busy during the timing, so their FPS are not measurements. Time them again on a "
    "quiet machine with `python -m cbn_detect.evaluate <job_dir>`."
)

PAIRED_NOTE = (
    f"Δ = norm − {BASELINE_NORM} in VOC07 mAP between two completed runs with the same model, images per "
    "process, world size and seed (paired by seed, so what a seed shares between the two runs cancels); "
    "a seed where either run did not complete is left out, and `pairs` counts the seeds left. "
    "Δ is the mean over those seeds; 95% CI is the Student-t interval of that mean over seeds, "
    "Δ ± t(0.975, pairs − 1) · sd(Δ) / √pairs, and \"-\" with fewer than 2 pairs. An interval that "
    "excludes 0 is a difference larger than the seed-to-seed spread of this sweep explains."
)


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The newest sweep under ``root``: Hydra writes ``multirun.yaml`` at the top of every sweep."""
    sweeps = [p.parent for p in root.glob("**/multirun.yaml")]
    if not sweeps:
        raise FileNotFoundError(f"no sweep found under {root.resolve()}; pass the sweep directory explicitly")
    return max(sweeps, key=lambda p: (p / "multirun.yaml").stat().st_mtime)


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (a folder holding ``.hydra/``), finished or not. A job whose
    ``results.json`` cannot be read is listed as ``unreadable``, its ``error`` naming the file."""
    rows = []
    for hydra_dir in sorted(sweep_dir.glob("**/.hydra")):
        job_dir = hydra_dir.parent
        try:
            found, problem = read_results(job_dir), None
        except UnreadableResults as err:
            log.warning("%s; listing the job as unreadable", err)
            found, problem = None, str(err)
        if found is not None:
            results = found.to_dict()
        else:
            results = _identity_from_config(hydra_dir / "config.yaml")
            results["status"] = "unfinished" if problem is None else "unreadable"
            if problem is not None:
                results["error"] = f"{problem}; rerun the job to redo it"
        holder = read_holder(job_dir)  # a live job.lock: a process is training it (again) right now
        if holder is not None and results["status"] != "completed":
            if stale_reason(holder, _lock_stale_h(hydra_dir / "config.yaml") * 3600) is None:
                results["status"], results["reason"] = "running", f"held by {holder.describe()}"
        results["job_dir"] = str(job_dir.relative_to(sweep_dir))
        rows.append(_flatten(results))
    return rows


def _identity_from_config(config_path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_path)
    return {
        "model": OmegaConf.select(cfg, "model.name"),
        "norm": OmegaConf.select(cfg, "norm.name"),
        "batch": OmegaConf.select(cfg, "data.batch"),
        "seed": OmegaConf.select(cfg, "seed"),
    }


def _lock_stale_h(config_path: Path) -> float:
    from omegaconf import OmegaConf

    return float(OmegaConf.select(OmegaConf.load(config_path), "train.lock_stale_h", default=6.0))


NESTED_COLUMNS = {
    "coco_ap50": ("coco", "AP50"), "fps_model": ("fps", "fps_model"), "fps_consistent": ("fps", "consistent"),
}
"""Row keys lifted out of results.json's nested fields: key -> (field, key inside it)."""


def _flatten(results: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in results.items() if not isinstance(v, dict)}
    for key, (field, inner) in NESTED_COLUMNS.items():
        row[key] = (results.get(field) or {}).get(inner)
    return row


def _mean_std(values: Sequence[Any]) -> str:
    estimate = stats.estimate(values)
    if estimate.mean is None:
        return "-"
    if estimate.std is None:
        return f"{estimate.mean:.4g}"
    return f"{estimate.mean:.4g} ± {estimate.std:.2g}"


def _group_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return str(row.get("model")), str(row.get("norm")), int(row.get("batch") or 0)


def _cells(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """The jobs of each (model, norm, batch) cell, cells in sorted order."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    return dict(sorted(groups.items()))


def _completed(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("status") == "completed"]


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown_header(header: Sequence[str]) -> list[str]:
    return [_markdown_row(header), "|" + "---|" * len(header)]


def _processes(members: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(world size, total batch) of a cell as table text.

    Taken from the completed runs, which the cell's numbers come from (a failed job may not know
    its world size); from all the cell's jobs when none completed. Mixed values are shown, not
    hidden, since averaging runs of different world sizes mixes two experiments.
    """
    known = [m for m in (_completed(members) or members) if m.get("world_size") is not None]
    settings = sorted({_world_and_total(m) for m in known})
    if not settings:
        return "-", "-"
    if len(settings) > 1:
        model, norm, batch = _group_key(members[0])
        log.warning("%s %s batch %d mixes world sizes %s", model, norm, batch, [w for w, _ in settings])
    return ", ".join(str(w) for w, _ in settings), ", ".join(str(t) for _, t in settings)


def _world_and_total(row: dict[str, Any]) -> tuple[int, int]:
    world_size = int(row["world_size"])
    return world_size, int(row.get("total_batch") or world_size * int(row.get("batch") or 0))


def _status_counts(members: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for member in members:
        counts[str(member.get("status", "unknown"))] += 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per (model, norm, batch), completed runs averaged over seeds."""
    header = ["model", "norm", "batch", "procs", "total batch", "n", "runs", *(title for _, title in COLUMNS)]
    lines = _markdown_header(header)
    for (model, norm, batch), members in _cells(rows).items():
        done = _completed(members)
        numbers = [_mean_std([m.get(key) for m in done]) for key, _ in COLUMNS]
        identity = [model, norm, str(batch), *_processes(members)]
        lines.append(_markdown_row([*identity, str(len(done)), _status_counts(members), *numbers]))
    return "\n".join(lines)


def _by_seed(members: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any], Any]:
    """The paired metric of each completed run keyed by (seed, world size), the pairing key: runs
    pair only when they share everything but the norm. A repeated key keeps the first job."""
    values: dict[tuple[Any, Any], Any] = {}
    for member in sorted(_completed(members), key=lambda m: str(m.get("job_dir"))):
        key = (member.get("seed"), member.get("world_size"))
        if key in values:
            log.warning("%s repeats seed %s at world size %s; only the first is paired", member.get("job_dir"), *key)
            continue
        values[key] = member.get(HEADLINE_METRIC)
    return values


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def paired_table(rows: Sequence[dict[str, Any]]) -> str | None:
    """Markdown table of each non-baseline cell's paired difference to BN; None without both kinds."""
    cells = _cells(rows)
    if not any(norm == BASELINE_NORM for _, norm, _ in cells):
        return None
    header = ["model", "norm", "batch", "procs", "pairs", f"Δ VOC07 mAP vs {BASELINE_NORM}", "95% CI"]
    lines = _markdown_header(header)
    for (model, norm, batch), members in cells.items():
        if norm == BASELINE_NORM:
            continue
        baseline = _by_seed(cells.get((model, BASELINE_NORM, batch), []))
        differences = stats.paired_differences(_by_seed(members), baseline)
        procs = ", ".join(str(w) for w in sorted({w for _, w in differences if w is not None})) or "-"
        diff = stats.estimate(differences.values())
        mean = "-" if diff.mean is None else _signed(diff.mean)
        interval = "-" if diff.low is None or diff.high is None else f"[{_signed(diff.low)}, {_signed(diff.high)}]"
        lines.append(_markdown_row([model, norm, str(batch), procs, str(diff.n), mean, interval]))
    return "\n".join(lines) if len(lines) > 2 else None


def paired_section(rows: Sequence[dict[str, Any]]) -> str:
    """The "Paired difference to BN" section: heading, what the numbers mean, the table."""
    heading = f"## Paired difference to {BASELINE_NORM.upper()} (VOC07 mAP)"
    table = paired_table(rows)
    if table is None:
        return f"{heading}\n\nNothing to pair: the sweep needs `{BASELINE_NORM}` and at least one other norm."
    return f"{heading}\n\n{PAIRED_NOTE}\n\n{table}"


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    fields = [
        "job_dir", "status", "model", "norm", "batch", "world_size", "total_batch", "seed",
        *(k for k, _ in COLUMNS), "reason", "error",
    ]
    out = StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


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
    from omegaconf import OmegaConf

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


def _save_png(figure: Figure, path: Path) -> None:
    """Atomic like every other file of a sweep: a report interrupted while drawing leaves no half PNG."""
    FigureCanvasAgg(figure)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    io.write_bytes(path, buffer.getvalue())


def _axes_grid(figure: Figure, count: int, width: float = 4.5) -> list[Axes]:
    figure.set_size_inches(width * count, 3.6)
    return list(np.atleast_1d(figure.subplots(1, count, squeeze=False)[0]))


def _norm_colors(norms: Sequence[str]) -> dict[str, Any]:
    palette = [f"C{i}" for i in range(10)]
    return {norm: palette[i % len(palette)] for i, norm in enumerate(norms)}


def _dodge(norms: Sequence[str], step: float = 0.06) -> dict[str, float]:
    """A small factor per norm on the log-2 batch axis, so error bars at one batch do not hide each other."""
    return {norm: 2.0 ** ((i - (len(norms) - 1) / 2) * step) for i, norm in enumerate(norms)}


def plot_map_vs_batch(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per model, one line per norm: mean VOC07 mAP over completed seeds with its 95% t-CI.

    The interval (not the std) is drawn because the figure's question is whether two norms differ;
    a cell with one seed has no interval and is drawn as an open marker without a bar (a zero-length
    bar with caps would read as a very precise number), one with none as a cross. The title says
    which of these the figure holds, and only those.
    """
    models = sorted({str(r.get("model")) for r in rows})
    norms = sorted({str(r.get("norm")) for r in rows})
    colors = _norm_colors(norms)
    dodge = _dodge(norms)
    cells = _cells(rows)
    figure = Figure()
    counts: set[int] = set()  # seeds per drawn point, over the whole figure
    any_missing = False
    for ax, model in zip(_axes_grid(figure, len(models)), models):
        for norm in norms:
            points: list[tuple[float, stats.Estimate]] = []
            missing: list[float] = []
            for batch in sorted(b for m, n, b in cells if (m, n) == (model, norm)):
                estimate = stats.estimate(r.get(HEADLINE_METRIC) for r in _completed(cells[(model, norm, batch)]))
                if estimate.mean is None:
                    missing.append(batch * dodge[norm])
                else:
                    points.append((batch * dodge[norm], estimate))
            _draw_norm(ax, norm, colors[norm], points, missing)
            counts.update(e.n for _, e in points)
            any_missing = any_missing or bool(missing)
        batches = sorted({b for m, _, b in cells if m == model})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("images per process")
        ax.set_ylabel("VOC07 mAP")
        ax.set_ylim(bottom=-0.02)
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(_map_note(counts, any_missing), fontsize="small")
    _save_png(figure, path)


def _map_note(counts: set[int], any_missing: bool) -> str:
    """What the mAP figure's marks mean, naming only the kinds of point it has."""
    if counts and max(counts) == 1:
        parts = ["each point is a single run (1 seed): no error bars"]
    else:
        parts = ["mean over seeds; bars: 95% t-CI of the mean (n ≥ 2)"]
        if 1 in counts:
            parts.append("open marker: a single run (no bar)")
    if any_missing:
        parts.append("×: no completed run")
    return ", ".join(parts)


def _draw_norm(
    ax: Axes, norm: str, color: Any, points: Sequence[tuple[float, stats.Estimate]], missing: Sequence[float]
) -> None:
    """One norm's line through its (x, estimate) points, an interval only at points of n >= 2 seeds,
    crosses on the axis at ``missing``."""
    if points:
        ax.plot([x for x, _ in points], [e.mean for _, e in points], marker="o", color=color, label=norm)
        spread = [(x, e) for x, e in points if e.n >= 2 and e.half_width is not None]
        if spread:
            ax.errorbar(
                [x for x, _ in spread], [e.mean for _, e in spread], yerr=[e.half_width for _, e in spread],
                fmt="none", capsize=3, color=color, label=f"_{norm} 95% CI",
            )
        single = [(x, e.mean) for x, e in points if e.n == 1]
        if single:
            ax.scatter(*zip(*single), marker="o", s=30, facecolors="white", edgecolors=color, zorder=3)
    if missing:
        ax.scatter(missing, [0.0] * len(missing), marker="x", s=60, color=color, label=f"{norm}: no completed run")


BURNIN_STYLE = {"linestyle": ":", "linewidth": 1.4}
LR_DECAY_STYLE = {"color": "0.35", "linestyle": "-.", "linewidth": 1.0}


def plot_loss_curves(rows: Sequence[dict[str, Any]], sweep_dir: Path, path: Path) -> None:
    """One panel per (model, batch), one colour per norm, one line per seed (dashed if not completed)
    with every training step's loss from ``metrics.jsonl``, the last step included.

    Vertical lines mark where training changed regime, from the completed runs' configs: dotted in
    the norm's colour, the end of CBN's plain-BN burn-in (statistics over the window from there
    on); dash-dotted grey, each lr decay of the step schedule. A jump in the loss at such a line is
    the schedule's doing, not the norm's.
    """
    panels = sorted({(str(r.get("model")), int(r.get("batch") or 0)) for r in rows})
    colors = _norm_colors(sorted({str(r.get("norm")) for r in rows}))
    figure = Figure()
    for ax, (model, batch) in zip(_axes_grid(figure, len(panels)), panels):
        labelled: set[str] = set()
        burnins: dict[str, set[int]] = defaultdict(set)
        decays: set[int] = set()
        for row in rows:
            if (str(row.get("model")), int(row.get("batch") or 0)) != (model, batch):
                continue
            job_dir = sweep_dir / row["job_dir"]
            norm = str(row.get("norm"))
            done = row.get("status") == "completed"
            if done:  # only a completed run's steps are the planned length that fractions refer to
                marks = schedule_marks(job_dir, row.get("steps"))
                if marks.burnin is not None:
                    burnins[norm].add(marks.burnin)
                decays.update(marks.lr_decays)
            steps, losses = load_loss_curve(job_dir / "metrics.jsonl")
            if not steps:
                continue
            label = None if norm in labelled else norm
            labelled.add(norm)
            ax.plot(
                steps, losses, color=colors[norm], linestyle="-" if done else "--", linewidth=0.9, alpha=0.8,
                label=label, gid=f"loss:{row['job_dir']}",
            )
        for norm, at in sorted(burnins.items()):
            for i, x in enumerate(sorted(at)):
                label = f"{norm}: burn-in ends (step {', '.join(map(str, sorted(at)))})" if i == 0 else None
                ax.axvline(x, color=colors[norm], label=label, gid=f"burnin:{norm}", **BURNIN_STYLE)
        for i, x in enumerate(sorted(decays)):
            label = f"lr decay (step {', '.join(map(str, sorted(decays)))})" if i == 0 else None
            ax.axvline(x, label=label, gid="lr_decay", **LR_DECAY_STYLE)
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (every step)")
        ax.grid(alpha=0.3)
        if labelled or burnins or decays:
            ax.legend(fontsize="small")
    _save_png(figure, path)


def plot_loss_variance(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: x = norm, one bar per batch size, height = mean over completed seeds, ± std where
    there are 2 seeds or more; a bar of a single run has no error bar (a zero-length one with caps
    would read as a very precise number). Each panel's title says which of these it holds, and "×"
    only when a grid point has no completed run."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        values = groups[_group_key(row)]  # every grid point of the sweep, with or without a number
        if row.get("status") == "completed":
            values += stats.finite([row.get("loss_variance")])
    models = sorted({str(r.get("model")) for r in rows})
    norms = sorted({str(r.get("norm")) for r in rows})
    batches = sorted({int(r.get("batch") or 0) for r in rows})
    width = 0.8 / max(len(batches), 1)
    figure = Figure()
    for ax, model in zip(_axes_grid(figure, len(models)), models):
        counts: set[int] = set()
        missing = False
        for i, batch in enumerate(batches):
            values = [groups.get((model, norm, batch)) for norm in norms]  # None: not in the sweep
            heights = [float(np.mean(v)) if v else 0.0 for v in values]
            xs = np.arange(len(norms)) + (i - (len(batches) - 1) / 2) * width
            ax.bar(xs, heights, width, label=f"batch {batch}", color=f"C{i % 10}")
            spread = [(x, h, float(np.std(v, ddof=1))) for x, h, v in zip(xs, heights, values) if v and len(v) > 1]
            if spread:
                ax.errorbar(
                    *zip(*((x, h) for x, h, _ in spread)), yerr=[e for _, _, e in spread], fmt="none",
                    capsize=2, ecolor="black", label=f"_batch {batch} std",
                )
            counts.update(len(v) for v in values if v)
            for x, v in zip(xs, values):
                if v == []:
                    missing = True
                    ax.text(x, 0, "×", ha="center", va="bottom", color="red")
        ax.set_xticks(np.arange(len(norms)), norms)
        ax.set_ylabel("loss variance (last epoch)")
        ax.set_title(f"{model} ({_variance_note(counts, missing)})", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    _save_png(figure, path)


def _variance_note(counts: set[int], missing: bool) -> str:
    """What a loss-variance panel's bars mean, naming only the kinds of bar it has."""
    if counts and max(counts) == 1:
        parts = ["single runs: no error bars"]
    else:
        parts = ["mean ± std over seeds"]
        if 1 in counts:
            parts.append("1 seed: no bar")
    if missing:
        parts.append("× = no completed run")
    return "; ".join(parts)


def write_figures(rows: Sequence[dict[str, Any]], sweep_dir: Path) -> list[Path]:
    paths = [sweep_dir / name for name, _ in FIGURES]
    plot_map_vs_batch(rows, paths[0])
    plot_loss_curves(rows, sweep_dir, paths[1])
    plot_loss_variance(rows, paths[2])
    return paths


@dataclass
class PictureFile:
    """One grid of ``detections_<model>_b<batch>.png``: its file, title and the jobs it shows."""

    name: str
    model: str
    batch: int
    jobs: dict[str, str]  # norm -> job directory (relative to the sweep)


def _picture_job(members: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The job a cell's picture shows: the completed seed 0, else the first completed by seed."""
    done = sorted(_completed(members), key=lambda m: (m.get("seed") != 0, m.get("seed") or 0, str(m.get("job_dir"))))
    return done[0] if done else None


def _font() -> str | None:
    """A TrueType font for the box labels (matplotlib's own DejaVu Sans; PIL's bitmap font without it)."""
    try:
        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except ValueError:
        return None


def _norm_order(norms: Sequence[str]) -> list[str]:
    return sorted(norms, key=lambda norm: (norm != BASELINE_NORM, norm))


def plot_detections(
    sweep_dir: Path, model: str, batch: int, jobs: dict[str, dict[str, Any]], path: Path,
    images: int = DEFAULT_IMAGES, score: float = DEFAULT_SCORE, splits: dict[str, SplitData] | None = None,
) -> dict[str, str]:
    """The grid for (model, batch): a column per test image, the ground truth on top, then a row per
    norm with its job's detections scoring at least ``score``. Returns the jobs drawn (norm -> job
    dir); a job whose test split or detections cannot be read is left out with a warning, and
    nothing is drawn when none can."""
    splits = {} if splits is None else splits
    font = _font()
    rows: list[tuple[str, list[Drawing], list[int] | None]] = []  # title, pictures, detections per image
    drawn: dict[str, str] = {}
    ids: list[str] = []
    for norm in _norm_order(list(jobs)):
        row = jobs[norm]
        job_dir = sweep_dir / str(row["job_dir"])
        try:
            split = job_test_split(job_dir, splits)
            if not ids:
                ids = [split.gt.image_ids[i] for i in pick_images(split.gt, images)]
            where = {image_id: i for i, image_id in enumerate(split.gt.image_ids)}
            missing = [image_id for image_id in ids if image_id not in where]
            if missing:
                raise ValueError(f"its test split lacks image {missing[0]}")
            examples = load_examples(
                split.dataset, split.gt, job_dir / "detections", split.split, split.classes,
                [where[image_id] for image_id in ids], score,
            )
        except Exception as err:  # noqa: BLE001 - a picture that cannot be drawn must not cost the report
            log.warning("%s: no detection picture (%s: %s)", row["job_dir"], type(err).__name__, err)
            continue
        if not rows:
            rows.append(("ground truth", [draw_ground_truth(e, split.classes, font=font) for e in examples], None))
        value = row.get(HEADLINE_METRIC)
        metric = "" if value is None else f"\nVOC07 mAP {value:.3f}"
        pictures = [draw_detections(e, split.classes, font=font) for e in examples]  # labels never overlap
        rows.append((f"{norm}\nseed {row.get('seed')}{metric}", pictures, [len(e.scores) for e in examples]))
        drawn[norm] = str(row["job_dir"])
    if not drawn:
        return drawn
    figure = Figure(figsize=(2.7 * len(ids), 2.7 * len(rows) + 0.5))
    axes = np.atleast_2d(figure.subplots(len(rows), len(ids), squeeze=False))
    for r, (title, pictures, counts) in enumerate(rows):
        for c, picture in enumerate(pictures):
            ax = axes[r, c]
            ax.imshow(picture.image.permute(1, 2, 0).numpy())
            note = f"no detection ≥ {score:g}" if counts is not None and counts[c] == 0 else None
            if picture.unlabelled:  # crowded: labels were placed best score first, these found no room
                note = f"{picture.unlabelled} of {len(picture.labels)} labels left out (no room)"
            if note is not None:
                ax.text(
                    0.5, 0.03, note, transform=ax.transAxes, ha="center", va="bottom",
                    fontsize="small", color="white", bbox={"facecolor": "black", "alpha": 0.6, "linewidth": 0},
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(ids[c], fontsize="small")
            if c == 0:
                ax.set_ylabel(title, fontsize="small")
    figure.suptitle(
        f"{model}, {batch} images per process: ground truth (top), then each norm's detections "
        f"with score ≥ {score:g}",
        fontsize="small",
    )
    figure.tight_layout()
    _save_png(figure, path)
    return drawn


def write_detection_pictures(
    rows: Sequence[dict[str, Any]], sweep_dir: Path, images: int = DEFAULT_IMAGES, score: float = DEFAULT_SCORE
) -> list[PictureFile]:
    """One ``detections_<model>_b<batch>.png`` per (model, batch) with a completed job that kept its
    detections (``detections/``); test splits are built once per distinct data config."""
    if images < 1:
        return []
    cells = _cells(rows)
    splits: dict[str, SplitData] = {}
    written = []
    for model, batch in sorted({(m, b) for m, _, b in cells}):
        jobs = {}
        for (m, norm, b), members in cells.items():
            job = _picture_job(members) if (m, b) == (model, batch) else None
            if job is not None and (sweep_dir / str(job["job_dir"]) / "detections").is_dir():
                jobs[norm] = job
        if not jobs:
            continue
        name = f"detections_{model}_b{batch}.png"
        drawn = plot_detections(sweep_dir, model, batch, jobs, sweep_dir / name, images, score, splits)
        if drawn:
            written.append(PictureFile(name, model, batch, drawn))
    return written


def _pictures_markdown(pictures: Sequence[PictureFile], images: int, score: float) -> list[str]:
    if not pictures:
        return []
    text = [
        "## Detections",
        "",
        f"The same {images} test images in every picture (the split's first with an object that is not difficult): "
        "the ground truth on top (difficult objects marked), then one row per norm with the detections scoring at "
        f"least {score:g}, read from the devkit files (`detections/`) of the norm's seed-0 job (else its first "
        "completed one). A box's colour is its class.",
        "",
    ]
    for picture in pictures:
        jobs = ", ".join(f"{norm}: `{job}`" for norm, job in picture.jobs.items())
        text += [
            f"### {picture.model}, {picture.batch} images per process",
            "",
            f"![{picture.model} detections at batch {picture.batch}]({picture.name})",
            "",
            f"Jobs: {jobs}.",
            "",
        ]
    return text


def _problem_line(row: dict[str, Any]) -> str:
    """One job that did not complete, with why: a skipped job's ``reason``, else the ``error``."""
    why = row.get("reason") or row.get("error")
    return f"- `{row['job_dir']}`: {row.get('status')}" + (f" ({why})" if why else "")


def report_markdown(
    sweep_dir: Path, rows: Sequence[dict[str, Any]], summary: str, paired: str,
    pictures: Sequence[PictureFile] = (), images: int = DEFAULT_IMAGES, score: float = DEFAULT_SCORE,
) -> str:
    """report.md: both tables with what their numbers mean, every job that did not complete, the
    figures, the detection pictures."""
    text = [f"# Sweep {sweep_dir}", "", "## Summary", "", SUMMARY_NOTE, "", summary, "", paired, ""]
    problems = [r for r in rows if r.get("status") != "completed"]
    if problems:
        text += ["## Jobs that did not complete", "", *map(_problem_line, problems), ""]
    disturbed = [f"- `{r['job_dir']}`" for r in rows if r.get("fps_consistent") is False]
    if disturbed:
        text += ["## FPS timings disturbed", "", DISTURBED_FPS_NOTE, "", *disturbed, ""]
    text += ["## Figures", ""]
    text += [f"![{title}]({name})\n" for name, title in FIGURES]
    text += _pictures_markdown(pictures, images, score)
    return "\n".join(text)


def write_report(
    sweep_dir: Path, images: int = DEFAULT_IMAGES, score: float = DEFAULT_SCORE
) -> tuple[str, list[str]]:
    """Write report.md, results.csv, the figures and the detection pictures (``images`` test images,
    detections from ``score`` up; 0 images: none); return what the CLI prints (the two tables) and
    the names of the figures and pictures written."""
    rows = collect_runs(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (folders with .hydra/)")
    summary = summary_table(rows)
    paired = paired_section(rows)
    write_figures(rows, sweep_dir)
    pictures = write_detection_pictures(rows, sweep_dir, images, score)
    io.write_text(sweep_dir / "report.md", report_markdown(sweep_dir, rows, summary, paired, pictures, images, score))
    io.write_text(sweep_dir / "results.csv", results_csv(rows))
    written = [name for name, _ in FIGURES] + [p.name for p in pictures]
    return f"{summary}\n\n{paired}", written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbn_detect.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a Hydra sweep directory (default: newest under multirun/)")
    parser.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, metavar="N",
        help=f"test images in each detection picture (default {DEFAULT_IMAGES}; 0: no pictures)",
    )
    parser.add_argument(
        "--score", type=float, default=DEFAULT_SCORE,
        help=f"draw the detections scoring at least this (default {DEFAULT_SCORE})",
    )
    args = parser.parse_args(argv)
    try:
        sweep_dir = args.sweep_dir or newest_sweep()
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
        tables, written = write_report(sweep_dir, args.images, args.score)
    except FileNotFoundError as err:
        print(f"cbn_detect.report: {err}", file=sys.stderr)
        return 2
    print(tables)
    print(f"\nwritten: {sweep_dir / 'report.md'}, {sweep_dir / 'results.csv'}, " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
