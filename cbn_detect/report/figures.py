"""The study's figures, drawn into the sweep directory and embedded in ``report.md``.

``map_vs_batch.png`` is the headline: how detection quality holds up as the images per process
shrink. ``loss_curves.png`` shows every training step's loss per norm at each batch size, from
``metrics.jsonl``, with CBN's burn-in end and the lr decays marked; ``loss_variance.png`` how noisy
training is per norm. A grid point without a completed run is drawn as a cross on the axis, and a
run that did not complete as a dashed loss curve; a point of a single seed has no error bar. The
figures' titles name only the marks they hold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cbn_detect import stats
from cbn_detect.report.collect import Cell, JobResult, cells, completed, load_loss_curve, schedule_marks
from cbn_detect.runtime import io

FIGURES: tuple[tuple[str, str], ...] = (
    ("map_vs_batch.png", "VOC07 mAP against images per process"),
    ("loss_curves.png", "Training loss per norm at each batch size"),
    ("loss_variance.png", "Training loss variance (last epoch) per norm"),
)
"""(file name, what it shows) of each figure, in report order."""

BURNIN_STYLE = {"linestyle": ":", "linewidth": 1.4}
LR_DECAY_STYLE = {"color": "0.35", "linestyle": "-.", "linewidth": 1.0}


def save_png(figure: Figure, path: Path) -> None:
    """Atomic like every other file of a sweep: a report interrupted while drawing leaves no half PNG."""
    FigureCanvasAgg(figure)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    io.write_bytes(path, buffer.getvalue())


def write_figures(rows: Sequence[JobResult], sweep_dir: Path) -> list[Path]:
    paths = [sweep_dir / name for name, _ in FIGURES]
    plot_map_vs_batch(rows, paths[0])
    plot_loss_curves(rows, sweep_dir, paths[1])
    plot_loss_variance(rows, paths[2])
    return paths


def figures_markdown() -> list[str]:
    """The figures' section of report.md."""
    return ["## Figures", "", *(f"![{title}]({name})\n" for name, title in FIGURES)]


def _axes_grid(figure: Figure, count: int, width: float = 4.5) -> list[Axes]:
    figure.set_size_inches(width * count, 3.6)
    return list(np.atleast_1d(figure.subplots(1, count, squeeze=False)[0]))


def _norm_colors(norms: Sequence[str]) -> dict[str, Any]:
    palette = [f"C{i}" for i in range(10)]
    return {norm: palette[i % len(palette)] for i, norm in enumerate(norms)}


def _dodge(norms: Sequence[str], step: float = 0.06) -> dict[str, float]:
    """A small factor per norm on the log-2 batch axis, so error bars at one batch do not hide each other."""
    return {norm: 2.0 ** ((i - (len(norms) - 1) / 2) * step) for i, norm in enumerate(norms)}


def plot_map_vs_batch(rows: Sequence[JobResult], path: Path) -> None:
    """One panel per model, one line per norm: mean VOC07 mAP over completed seeds with its 95% t-CI.

    The interval (not the std) is drawn because the figure's question is whether two norms differ;
    a cell with one seed has no interval and is drawn as an open marker without a bar (a zero-length
    bar with caps would read as a very precise number), one with none as a cross. The title says
    which of these the figure holds, and only those.
    """
    models = sorted({str(r.model) for r in rows})
    norms = sorted({str(r.norm) for r in rows})
    colors = _norm_colors(norms)
    dodge = _dodge(norms)
    grid = cells(rows)
    figure = Figure()
    counts: set[int] = set()  # seeds per drawn point, over the whole figure
    any_missing = False
    for ax, model in zip(_axes_grid(figure, len(models)), models):
        for norm in norms:
            points, missing = _map_points(grid, model, norm, dodge[norm])
            _draw_norm(ax, norm, colors[norm], points, missing)
            counts.update(e.n for _, e in points)
            any_missing = any_missing or bool(missing)
        batches = sorted({b for m, _, b in grid if m == model})
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
    save_png(figure, path)


def _map_points(
    grid: dict[Cell, list[JobResult]], model: str, norm: str, dodge: float
) -> tuple[list[tuple[float, stats.Estimate]], list[float]]:
    """(x, estimate) of each of the norm's batches with a completed run, and the x of those without."""
    points: list[tuple[float, stats.Estimate]] = []
    missing: list[float] = []
    for batch in sorted(b for m, n, b in grid if (m, n) == (model, norm)):
        estimate = stats.estimate(r.map_voc07 for r in completed(grid[(model, norm, batch)]))
        if estimate.mean is None:
            missing.append(batch * dodge)
        else:
            points.append((batch * dodge, estimate))
    return points, missing


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
                [x for x, _ in spread],
                [e.mean for _, e in spread],
                yerr=[e.half_width for _, e in spread],
                fmt="none",
                capsize=3,
                color=color,
                label=f"_{norm} 95% CI",
            )
        single = [(x, e.mean) for x, e in points if e.n == 1]
        if single:
            ax.scatter(*zip(*single), marker="o", s=30, facecolors="white", edgecolors=color, zorder=3)
    if missing:
        ax.scatter(missing, [0.0] * len(missing), marker="x", s=60, color=color, label=f"{norm}: no completed run")


def plot_loss_curves(rows: Sequence[JobResult], sweep_dir: Path, path: Path) -> None:
    """One panel per (model, batch), one colour per norm, one line per seed (dashed if not completed)
    with every training step's loss from ``metrics.jsonl``, the last step included.

    Vertical lines mark where training changed regime, from the completed runs' configs: dotted in
    the norm's colour, the end of CBN's plain-BN burn-in (statistics over the window from there
    on); dash-dotted grey, each lr decay of the step schedule. A jump in the loss at such a line is
    the schedule's doing, not the norm's.
    """
    panels = sorted({(str(r.model), int(r.batch or 0)) for r in rows})
    colors = _norm_colors(sorted({str(r.norm) for r in rows}))
    figure = Figure()
    for ax, (model, batch) in zip(_axes_grid(figure, len(panels)), panels):
        jobs = [r for r in rows if (str(r.model), int(r.batch or 0)) == (model, batch)]
        drawn = _draw_loss_curves(ax, jobs, sweep_dir, colors)
        marked = _draw_schedule_marks(ax, jobs, sweep_dir, colors)
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (every step)")
        ax.grid(alpha=0.3)
        if drawn or marked:
            ax.legend(fontsize="small")
    save_png(figure, path)


def _draw_loss_curves(ax: Axes, jobs: Sequence[JobResult], sweep_dir: Path, colors: dict[str, Any]) -> bool:
    """Each job's loss curve, the norm named once in the legend; whether any was drawn."""
    labelled: set[str] = set()
    for job in jobs:
        steps, losses = load_loss_curve(sweep_dir / job.job_dir / "metrics.jsonl")
        if not steps:
            continue
        norm = str(job.norm)
        ax.plot(
            steps,
            losses,
            color=colors[norm],
            linestyle="-" if job.completed else "--",
            linewidth=0.9,
            alpha=0.8,
            label=None if norm in labelled else norm,
            gid=f"loss:{job.job_dir}",
        )
        labelled.add(norm)
    return bool(labelled)


def _draw_schedule_marks(ax: Axes, jobs: Sequence[JobResult], sweep_dir: Path, colors: dict[str, Any]) -> bool:
    """The burn-in ends and lr decays of the completed jobs (only a completed run's steps are the
    planned length that the schedule's fractions refer to); whether there were any."""
    burnins: dict[str, set[int]] = defaultdict(set)
    decays: set[int] = set()
    for job in completed(jobs):
        marks = schedule_marks(sweep_dir / job.job_dir, job.steps)
        if marks.burnin is not None:
            burnins[str(job.norm)].add(marks.burnin)
        decays.update(marks.lr_decays)
    for norm, at in sorted(burnins.items()):
        for i, x in enumerate(sorted(at)):
            label = f"{norm}: burn-in ends (step {', '.join(map(str, sorted(at)))})" if i == 0 else None
            ax.axvline(x, color=colors[norm], label=label, gid=f"burnin:{norm}", **BURNIN_STYLE)
    for i, x in enumerate(sorted(decays)):
        label = f"lr decay (step {', '.join(map(str, sorted(decays)))})" if i == 0 else None
        ax.axvline(x, label=label, gid="lr_decay", **LR_DECAY_STYLE)
    return bool(burnins or decays)


def plot_loss_variance(rows: Sequence[JobResult], path: Path) -> None:
    """Grouped bars: x = norm, one bar per batch size, height = mean over completed seeds, ± std where
    there are 2 seeds or more; a bar of a single run has no error bar (a zero-length one with caps
    would read as a very precise number). Each panel's title says which of these it holds, and "×"
    only when a grid point has no completed run."""
    groups: dict[Cell, list[float]] = defaultdict(list)
    for row in rows:
        values = groups[row.cell]  # every grid point of the sweep, with or without a number
        if row.completed:
            values += stats.finite([row.loss_variance])
    models = sorted({str(r.model) for r in rows})
    norms = sorted({str(r.norm) for r in rows})
    batches = sorted({int(r.batch or 0) for r in rows})
    figure = Figure()
    for ax, model in zip(_axes_grid(figure, len(models)), models):
        counts: set[int] = set()
        missing = False
        for i, batch in enumerate(batches):
            values = [groups.get((model, norm, batch)) for norm in norms]  # None: not in the sweep
            missing = _draw_variance_bars(ax, i, len(batches), batch, values) or missing
            counts.update(len(v) for v in values if v)
        ax.set_xticks(np.arange(len(norms)), norms)
        ax.set_ylabel("loss variance (last epoch)")
        ax.set_title(f"{model} ({_variance_note(counts, missing)})", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    save_png(figure, path)


def _draw_variance_bars(ax: Axes, i: int, n_batches: int, batch: int, values: list[list[float] | None]) -> bool:
    """The bars of the ``i``-th of ``n_batches`` batch sizes, one per norm, ``values`` being each
    norm's completed seeds (None: not in the sweep); whether a grid point had no completed run."""
    width = 0.8 / max(n_batches, 1)
    heights = [float(np.mean(v)) if v else 0.0 for v in values]
    xs = np.arange(len(values)) + (i - (n_batches - 1) / 2) * width
    ax.bar(xs, heights, width, label=f"batch {batch}", color=f"C{i % 10}")
    spread = [(x, h, float(np.std(v, ddof=1))) for x, h, v in zip(xs, heights, values) if v and len(v) > 1]
    if spread:
        ax.errorbar(
            *zip(*((x, h) for x, h, _ in spread)),
            yerr=[e for _, _, e in spread],
            fmt="none",
            capsize=2,
            ecolor="black",
            label=f"_batch {batch} std",
        )
    empty = [x for x, v in zip(xs, values) if v == []]
    for x in empty:
        ax.text(x, 0, "×", ha="center", va="bottom", color="red")
    return bool(empty)


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
