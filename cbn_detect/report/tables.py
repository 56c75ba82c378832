"""The report's text: the summary table (mean ± std over seeds per model x norm x batch), each norm's
paired difference to BN with its 95% t-interval, ``results.csv`` and ``report.md``. The statistics
live in :mod:`cbn_detect.stats`; this module lays them out."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from io import StringIO
from pathlib import Path

from cbn_detect import stats
from cbn_detect.report.collect import BASELINE_NORM, JobResult, cells, completed

log = logging.getLogger(__name__)

COLUMNS: tuple[tuple[str, str], ...] = (
    ("map_voc07", "VOC07 mAP"),
    ("map_area", "area mAP"),
    ("coco_ap50", "COCO AP50"),
    ("fps_model", "FPS"),
    ("loss_variance", "loss var"),
    ("train_time_s", "train s"),
)
"""The numbers of the summary and of results.csv: (:class:`JobResult` field, column title)."""

CSV_FIELDS: tuple[str, ...] = (
    "job_dir",
    "status",
    "model",
    "norm",
    "batch",
    "world_size",
    "total_batch",
    "seed",
    *(key for key, _ in COLUMNS),
    "reason",
    "error",
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
    'Δ ± t(0.975, pairs − 1) · sd(Δ) / √pairs, and "-" with fewer than 2 pairs. An interval that '
    "excludes 0 is a difference larger than the seed-to-seed spread of this sweep explains."
)


def _mean_std(values: Iterable[float | None]) -> str:
    estimate = stats.estimate(values)
    if estimate.mean is None:
        return "-"
    if estimate.std is None:
        return f"{estimate.mean:.4g}"
    return f"{estimate.mean:.4g} ± {estimate.std:.2g}"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown_header(header: Sequence[str]) -> list[str]:
    return [_markdown_row(header), "|" + "---|" * len(header)]


def _processes(members: Sequence[JobResult]) -> tuple[str, str]:
    """(world size, total batch) of a cell as table text.

    Taken from the completed runs, which the cell's numbers come from (a failed job may not know
    its world size); from all the cell's jobs when none completed. Mixed values are shown, not
    hidden, since averaging runs of different world sizes mixes two experiments.
    """
    known = [m for m in (completed(members) or members) if m.world_size is not None]
    settings = sorted({_world_and_total(m) for m in known})
    if not settings:
        return "-", "-"
    if len(settings) > 1:
        model, norm, batch = members[0].cell
        log.warning("%s %s batch %d mixes world sizes %s", model, norm, batch, [w for w, _ in settings])
    return ", ".join(str(w) for w, _ in settings), ", ".join(str(t) for _, t in settings)


def _world_and_total(row: JobResult) -> tuple[int, int]:
    world_size = int(row.world_size)
    return world_size, int(row.total_batch or world_size * int(row.batch or 0))


def _status_counts(members: Sequence[JobResult]) -> str:
    counts = Counter("unknown" if m.status is None else m.status for m in members)
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def summary_table(rows: Sequence[JobResult]) -> str:
    """Markdown table: one line per (model, norm, batch), completed runs averaged over seeds."""
    header = ["model", "norm", "batch", "procs", "total batch", "n", "runs", *(title for _, title in COLUMNS)]
    lines = _markdown_header(header)
    for (model, norm, batch), members in cells(rows).items():
        done = completed(members)
        numbers = [_mean_std(getattr(m, key) for m in done) for key, _ in COLUMNS]
        identity = [model, norm, str(batch), *_processes(members)]
        lines.append(_markdown_row([*identity, str(len(done)), _status_counts(members), *numbers]))
    return "\n".join(lines)


def _by_seed(members: Sequence[JobResult]) -> dict[tuple[int | None, int | None], float | None]:
    """The paired metric of each completed run keyed by (seed, world size), the pairing key: runs
    pair only when they share everything but the norm. A repeated key keeps the first job."""
    values: dict[tuple[int | None, int | None], float | None] = {}
    for member in sorted(completed(members), key=lambda m: m.job_dir):
        key = (member.seed, member.world_size)
        if key in values:
            log.warning("%s repeats seed %s at world size %s; only the first is paired", member.job_dir, *key)
            continue
        values[key] = member.map_voc07
    return values


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def paired_table(rows: Sequence[JobResult]) -> str | None:
    """Markdown table of each non-baseline cell's paired difference to BN; None without both kinds."""
    grid = cells(rows)
    if not any(norm == BASELINE_NORM for _, norm, _ in grid):
        return None
    header = ["model", "norm", "batch", "procs", "pairs", f"Δ VOC07 mAP vs {BASELINE_NORM}", "95% CI"]
    lines = _markdown_header(header)
    for (model, norm, batch), members in grid.items():
        if norm == BASELINE_NORM:
            continue
        baseline = _by_seed(grid.get((model, BASELINE_NORM, batch), []))
        differences = stats.paired_differences(_by_seed(members), baseline)
        procs = ", ".join(str(w) for w in sorted({w for _, w in differences if w is not None})) or "-"
        diff = stats.estimate(differences.values())
        mean = "-" if diff.mean is None else _signed(diff.mean)
        interval = "-" if diff.low is None or diff.high is None else f"[{_signed(diff.low)}, {_signed(diff.high)}]"
        lines.append(_markdown_row([model, norm, str(batch), procs, str(diff.n), mean, interval]))
    return "\n".join(lines) if len(lines) > 2 else None


def paired_section(rows: Sequence[JobResult]) -> str:
    """The "Paired difference to BN" section: heading, what the numbers mean, the table."""
    heading = f"## Paired difference to {BASELINE_NORM.upper()} (VOC07 mAP)"
    table = paired_table(rows)
    if table is None:
        return f"{heading}\n\nNothing to pair: the sweep needs `{BASELINE_NORM}` and at least one other norm."
    return f"{heading}\n\n{PAIRED_NOTE}\n\n{table}"


def results_csv(rows: Sequence[JobResult]) -> str:
    """Every job, one line each: what results.json says of it, or why it has no numbers."""
    out = StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({name: getattr(row, name) for name in CSV_FIELDS} for row in rows)
    return out.getvalue()


def _problem_line(row: JobResult) -> str:
    """One job that did not complete, with why: a skipped job's ``reason``, else the ``error``."""
    why = row.reason or row.error
    return f"- `{row.job_dir}`: {row.status}" + (f" ({why})" if why else "")


def report_markdown(
    sweep_dir: Path,
    rows: Sequence[JobResult],
    summary: str,
    paired: str,
    figures: Sequence[str] = (),
    pictures: Sequence[str] = (),
) -> str:
    """report.md: both tables with what their numbers mean, every job that did not complete, then
    the lines of the figures and of the detection pictures."""
    text = [f"# Sweep {sweep_dir}", "", "## Summary", "", SUMMARY_NOTE, "", summary, "", paired, ""]
    problems = [r for r in rows if not r.completed]
    if problems:
        text += ["## Jobs that did not complete", "", *map(_problem_line, problems), ""]
    disturbed = [f"- `{r.job_dir}`" for r in rows if r.fps_consistent is False]
    if disturbed:
        text += ["## FPS timings disturbed", "", DISTURBED_FPS_NOTE, "", *disturbed, ""]
    return "\n".join([*text, *figures, *pictures])
