"""Compare the runs of a sweep: ``python -m cbn_detect.report [<sweep_dir>]``.

Reads every job's ``results.json`` (and notices job directories without one), prints a table of
model x norm x batch with mean +- std over seeds, and writes ``report.md`` and ``results.csv`` into
the sweep directory. Failed, diverged and unfinished jobs are listed as such, never dropped.

It also draws the study's figures into the sweep directory, embedded in ``report.md``:
``map_vs_batch.png`` (the headline: how detection quality holds up as the batch per GPU shrinks),
``loss_curves.png`` (training loss per norm at each batch size, from ``metrics.jsonl``) and
``loss_variance.png`` (how noisy training is per norm). A grid point without a completed run is
drawn as a cross on the axis, and a run that did not complete as a dashed loss curve.
"""

from __future__ import annotations

import argparse
import csv
import io as text_io
import json
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cbn_detect.engine import io

log = logging.getLogger(__name__)

FIGURES: tuple[tuple[str, str], ...] = (
    ("map_vs_batch.png", "VOC07 mAP against batch size per GPU"),
    ("loss_curves.png", "Training loss per norm at each batch size"),
    ("loss_variance.png", "Training loss variance (last epoch) per norm"),
)

COLUMNS: tuple[tuple[str, str], ...] = (
    ("map_voc07", "VOC07 mAP"),
    ("map_area", "area mAP"),
    ("coco_ap50", "COCO AP50"),
    ("fps_model", "FPS"),
    ("loss_variance", "loss var"),
    ("train_time_s", "train s"),
)


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The newest sweep under ``root``: Hydra writes ``multirun.yaml`` at the top of every sweep."""
    sweeps = [p.parent for p in root.glob("**/multirun.yaml")]
    if not sweeps:
        raise FileNotFoundError(f"no sweep found under {root.resolve()}; pass the sweep directory explicitly")
    return max(sweeps, key=lambda p: (p / "multirun.yaml").stat().st_mtime)


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (a folder holding ``.hydra/``), finished or not."""
    rows = []
    for hydra_dir in sorted(sweep_dir.glob("**/.hydra")):
        job_dir = hydra_dir.parent
        results_path = job_dir / "results.json"
        if results_path.exists():
            results = json.loads(results_path.read_text(encoding="utf-8"))
        else:
            results = _identity_from_config(hydra_dir / "config.yaml")
            results["status"] = "unfinished"
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


def _flatten(results: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in results.items() if not isinstance(v, dict)}
    row["coco_ap50"] = (results.get("coco") or {}).get("AP50")
    row["fps_model"] = (results.get("fps") or {}).get("fps_model")
    return row


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_std(values: Sequence[float]) -> str:
    finite = _finite(values)
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.4g}"
    return f"{np.mean(finite):.4g} ± {np.std(finite, ddof=1):.2g}"


def _group_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return str(row.get("model")), str(row.get("norm")), int(row.get("batch") or 0)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per (model, norm, batch), completed runs averaged over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    header = ["model", "norm", "batch", "runs"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, norm, batch), members in sorted(groups.items()):
        done = [m for m in members if m.get("status") == "completed"]
        statuses = defaultdict(int)
        for m in members:
            statuses[m.get("status", "unknown")] += 1
        runs = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        cells = [_mean_std([m.get(key) for m in done]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join([model, norm, str(batch), runs, *cells]) + " |")
    return "\n".join(lines)


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    fields = ["job_dir", "status", "model", "norm", "batch", "world_size", "seed", *(k for k, _ in COLUMNS), "error"]
    out = text_io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def load_loss_curve(metrics_path: Path) -> tuple[list[int], list[float]]:
    """(steps, training losses) from ``metrics.jsonl``; a line cut short by a kill is skipped."""
    steps, losses = [], []
    if not metrics_path.exists():
        return steps, losses
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("loss") is not None:
            steps.append(int(record["step"]))
            losses.append(float(record["loss"]))
    return steps, losses


def _save_png(figure: Figure, path: Path) -> None:
    """Atomic like every other file of a sweep: a report interrupted while drawing leaves no half PNG."""
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def _axes_grid(figure: Figure, count: int, width: float = 4.5) -> list[Axes]:
    figure.set_size_inches(width * count, 3.6)
    return list(np.atleast_1d(figure.subplots(1, count, squeeze=False)[0]))


def _norm_colors(norms: Sequence[str]) -> dict[str, Any]:
    palette = [f"C{i}" for i in range(10)]
    return {norm: palette[i % len(palette)] for i, norm in enumerate(norms)}


def plot_map_vs_batch(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per model, one line per norm: mean VOC07 mAP over completed seeds, +- std."""
    models = sorted({str(r.get("model")) for r in rows})
    norms = sorted({str(r.get("norm")) for r in rows})
    colors = _norm_colors(norms)
    figure = Figure()
    for ax, model in zip(_axes_grid(figure, len(models)), models):
        missing_label = "no completed run"
        for norm in norms:
            members = [r for r in rows if str(r.get("model")) == model and str(r.get("norm")) == norm]
            batches = sorted({int(r.get("batch") or 0) for r in members})
            xs, means, stds, missing = [], [], [], []
            for batch in batches:
                values = _finite([r.get("map_voc07") for r in members if int(r.get("batch") or 0) == batch and r.get("status") == "completed"])
                if values:
                    xs.append(batch)
                    means.append(float(np.mean(values)))
                    stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
                else:
                    missing.append(batch)
            if xs:
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=colors[norm], label=norm)
            if missing:
                ax.scatter(missing, [0.0] * len(missing), marker="x", s=60, color=colors[norm], label=f"{norm}: {missing_label}")
        ax.set_xscale("log", base=2)
        batches = sorted({int(r.get("batch") or 0) for r in rows if str(r.get("model")) == model})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch per GPU")
        ax.set_ylabel("VOC07 mAP")
        ax.set_ylim(bottom=-0.02)
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save_png(figure, path)


def plot_loss_curves(rows: Sequence[dict[str, Any]], sweep_dir: Path, path: Path) -> None:
    """One panel per (model, batch), one colour per norm, one line per seed; dashed if not completed."""
    panels = sorted({(str(r.get("model")), int(r.get("batch") or 0)) for r in rows})
    colors = _norm_colors(sorted({str(r.get("norm")) for r in rows}))
    figure = Figure()
    for ax, (model, batch) in zip(_axes_grid(figure, len(panels)), panels):
        labelled: set[str] = set()
        for row in rows:
            if (str(row.get("model")), int(row.get("batch") or 0)) != (model, batch):
                continue
            steps, losses = load_loss_curve(sweep_dir / row["job_dir"] / "metrics.jsonl")
            if not steps:
                continue
            norm = str(row.get("norm"))
            done = row.get("status") == "completed"
            label = None if norm in labelled else norm
            labelled.add(norm)
            ax.plot(steps, losses, color=colors[norm], linestyle="-" if done else "--", alpha=0.8, label=label)
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize="small")
    _save_png(figure, path)


def plot_loss_variance(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: x = norm, one bar per batch size, height = mean over completed seeds, +- std."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        values = groups[_group_key(row)]  # every grid point of the sweep, with or without a number
        if row.get("status") == "completed":
            values += _finite([row.get("loss_variance")])
    models = sorted({str(r.get("model")) for r in rows})
    norms = sorted({str(r.get("norm")) for r in rows})
    batches = sorted({int(r.get("batch") or 0) for r in rows})
    width = 0.8 / max(len(batches), 1)
    figure = Figure()
    for ax, model in zip(_axes_grid(figure, len(models)), models):
        for i, batch in enumerate(batches):
            values = [groups.get((model, norm, batch)) for norm in norms]  # None: not in the sweep
            heights = [float(np.mean(v)) if v else 0.0 for v in values]
            errors = [float(np.std(v, ddof=1)) if v and len(v) > 1 else 0.0 for v in values]
            xs = np.arange(len(norms)) + (i - (len(batches) - 1) / 2) * width
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=f"batch {batch}", color=f"C{i % 10}")
            for x, v in zip(xs, values):
                if v == []:
                    ax.text(x, 0, "×", ha="center", va="bottom", color="red")
        ax.set_xticks(np.arange(len(norms)), norms)
        ax.set_ylabel("loss variance (last epoch)")
        ax.set_title(f"{model} (× = no completed run)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    _save_png(figure, path)


def write_figures(rows: Sequence[dict[str, Any]], sweep_dir: Path) -> list[Path]:
    paths = [sweep_dir / name for name, _ in FIGURES]
    plot_map_vs_batch(rows, paths[0])
    plot_loss_curves(rows, sweep_dir, paths[1])
    plot_loss_variance(rows, paths[2])
    return paths


def write_report(sweep_dir: Path) -> str:
    rows = collect_runs(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (folders with .hydra/)")
    table = summary_table(rows)
    problems = [r for r in rows if r.get("status") != "completed"]
    text = [f"# Sweep {sweep_dir}", "", table, ""]
    if problems:
        text += ["## Jobs that did not complete", ""]
        text += [f"- `{r['job_dir']}`: {r.get('status')}" + (f" ({r['error']})" if r.get("error") else "") for r in problems]
        text.append("")
    write_figures(rows, sweep_dir)
    text += ["## Figures", ""]
    text += [f"![{title}]({name})\n" for name, title in FIGURES]
    io.write_text(sweep_dir / "report.md", "\n".join(text))
    io.write_text(sweep_dir / "results.csv", results_csv(rows))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbn_detect.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a Hydra sweep directory (default: newest under multirun/)")
    args = parser.parse_args(argv)
    try:
        sweep_dir = args.sweep_dir or newest_sweep()
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
        table = write_report(sweep_dir)
    except FileNotFoundError as err:
        print(f"cbn_detect.report: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwritten: {sweep_dir / 'report.md'}, {sweep_dir / 'results.csv'}, " + ", ".join(name for name, _ in FIGURES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
