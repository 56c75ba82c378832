"""Compare the runs of a sweep: ``python -m cbn_detect.report [<sweep_dir>]``.

Writes ``report.md``, ``results.csv``, the figures and the detection pictures into the sweep
directory and prints the two tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbn_detect.evaluation.pictures import DEFAULT_IMAGES, DEFAULT_SCORE
from cbn_detect.report.collect import collect_runs, newest_sweep
from cbn_detect.report.figures import FIGURES, figures_markdown, write_figures
from cbn_detect.report.pictures import pictures_markdown, write_detection_pictures
from cbn_detect.report.tables import paired_section, report_markdown, results_csv, summary_table
from cbn_detect.runtime import io


def write_report(sweep_dir: Path, images: int = DEFAULT_IMAGES, score: float = DEFAULT_SCORE) -> tuple[str, list[str]]:
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
    markdown = report_markdown(
        sweep_dir, rows, summary, paired, figures_markdown(), pictures_markdown(pictures, images, score)
    )
    io.write_text(sweep_dir / "report.md", markdown)
    io.write_text(sweep_dir / "results.csv", results_csv(rows))
    written = [name for name, _ in FIGURES] + [p.name for p in pictures]
    return f"{summary}\n\n{paired}", written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbn_detect.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir", nargs="?", type=Path, help="a Hydra sweep directory (default: newest under multirun/)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help=f"test images in each detection picture (default {DEFAULT_IMAGES}; 0: no pictures)",
    )
    parser.add_argument(
        "--score",
        type=float,
        default=DEFAULT_SCORE,
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
