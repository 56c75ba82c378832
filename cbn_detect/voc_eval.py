"""Score devkit-format result files (ours or anyone's) against a VOC split, as the devkit would.

    python -m cbn_detect.voc_eval --run RUN_DIR [--metric voc07|area] [--json FILE]
    python -m cbn_detect.voc_eval --voc-dir .../VOCdevkit[/VOC2007] --split test --results DIR \
        [--metric voc07|area] [--json FILE] [--classes a,b,c] [--allow-missing]

``--run`` rescores a cbn_detect run: its ``results.json`` names the dataset folder it was evaluated
on (``dataset_dir``: for the synthetic set a hashed cache folder nothing else records), the split
and the classes, and its ``detections/`` holds the files; any of --voc-dir, --results, --split and
--classes given as well overrides what the run says.

Prints which folders it scores, a per-class table and the mAP; --json writes
{"metric", "mAP", "ap": {class: AP}} with AP as fractions (null for a class without positives).
Every class scored needs its file, an empty one when the class has no detection (cbn_detect
writes one for every class): a missing file is far more often a lost or mistyped file than a
method that skipped a class, so it is an error unless --allow-missing says to score it as no
detections. A results folder without any file for the split is always an error (a mistyped
--results or --split).

Without --classes the class list comes from the run's results.json (with --run), else from the
dataset itself (the synthetic set's params.json), else from the result files present when they name
a class VOC does not have, else VOC's 20.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    discover_classes,
    read_detections,
    read_ground_truth,
    result_classes,
)
from cbn_detect.evaluation.voc_ap import METRICS, VOCResult, evaluate_voc
from cbn_detect.results import RESULTS_FILE, read_results
from cbn_detect.runtime import io
from cbn_detect.runtime.errors import ReportedError

log = logging.getLogger(__name__)

VOC_YEAR = re.compile(r"VOC\d{4}")
"""A VOCdevkit's per-year folders: VOC2007, VOC2012 (beside them, the devkit's own VOCcode/, ...)."""

DEFAULT_SPLIT = "test"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cbn_detect.voc_eval",
        description="Score comp4_det_<split>_<class>.txt detection files (ours or anyone's) against a "
        "VOC-layout split by the official VOC devkit's rules; prints AP per class and the mAP.",
        epilog="A cbn_detect run: --run RUN_DIR (its results.json names the dataset folder, split and "
        "classes; its detections/ holds the files). Other files: --voc-dir and --results.",
    )
    parser.add_argument(
        "--run",
        type=Path,
        metavar="RUN_DIR",
        help="a cbn_detect run folder: scores its detections/ against the dataset folder, split and "
        "classes its results.json records (the options below override them)",
    )
    parser.add_argument(
        "--voc-dir",
        type=Path,
        help="the VOC<year> folder (.../VOCdevkit/VOC2007), or the VOCdevkit folder holding it "
        "(holding several years, name the year's folder)",
    )
    parser.add_argument("--split", help=f"ImageSets/Main/<split>.txt (default {DEFAULT_SPLIT}, or the run's)")
    parser.add_argument("--results", type=Path, help="folder of result files")
    parser.add_argument("--metric", choices=METRICS, default="voc07", help="default voc07")
    parser.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    parser.add_argument(
        "--classes",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=None,
        help="comma-separated class names in label order (default: the run's, with --run; else the "
        "dataset's own list, e.g. the synthetic set's params.json; else the result files' classes "
        "when they are not VOC's; else the 20 VOC classes)",
    )
    parser.add_argument("--prefix", default="comp4_det", help="result file prefix (comp4_det)")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score a class without a result file as having no detections (AP 0), with a warning "
        "naming it; without this flag a missing class file is an error (cbn_detect writes a file, "
        "empty if need be, for every class)",
    )
    args = parser.parse_args(argv)
    if args.run is None and (args.voc_dir is None or args.results is None):
        parser.error("give --run RUN_DIR, or both --voc-dir and --results")
    return args


def format_table(result: VOCResult) -> str:
    """Per-class AP in percent, as papers print them, then the mAP."""
    width = max(len("class"), *(len(name) for name in result.ap))
    lines = [f"{'class':<{width}}  {'positives':>9}  {'AP (%)':>8}"]
    for name, ap in result.ap.items():
        shown = f"{'n/a':>8}  (no positives)" if ap is None else f"{100 * ap:8.2f}"
        lines.append(f"{name:<{width}}  {result.n_pos[name]:>9}  {shown}")
    lines.append(f"{'mAP':<{width}}  {'':>9}  {100 * result.map:8.2f}  ({result.metric})")
    return "\n".join(lines)


def _from_run(args: argparse.Namespace) -> str | None:
    """Fill --voc-dir, --results, --split and --classes the user left out from the run's
    ``results.json``; returns where the classes came from when they came from it. A run folder
    whose file cannot say (none, a failed run, one written before ``dataset_dir`` existed) is an
    error naming the file and what to pass instead."""
    run_dir: Path = args.run
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    path = run_dir / RESULTS_FILE
    results = read_results(run_dir)
    if results is None:
        raise FileNotFoundError(
            f"{path} not found: --run wants the folder of a finished run (or pass --voc-dir and --results)"
        )
    if results.status != "completed":
        raise ValueError(f"{path}: the run is {results.status}, so it has no final detections to score")
    if args.voc_dir is None:
        if results.dataset_dir is None:
            raise ValueError(
                f"{path} does not record its dataset_dir (an older cbn_detect wrote it): pass --voc-dir too"
            )
        args.voc_dir = Path(results.dataset_dir)
    if args.results is None:
        args.results = run_dir / "detections"
    if args.split is None:
        args.split = results.test_split or DEFAULT_SPLIT
    if args.classes is None and results.ap_per_class:
        args.classes = list(results.ap_per_class)
        return str(path)
    return None


def resolve_voc_dir(path: Path) -> Path:
    """The ``VOC<year>`` folder to score: ``path`` itself, or the one ``VOC<year>`` folder of the
    VOCdevkit folder ``path`` (``data.root`` points there, so users pass it here too). A devkit
    holding several years is an error naming them: which one the split means is the user's call."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: VOC directory not found")
    if _is_voc_year_folder(path):
        return path
    years = sorted(p.name for p in path.iterdir() if VOC_YEAR.fullmatch(p.name) and _is_voc_year_folder(p))
    if len(years) == 1:
        log.info("%s is a VOCdevkit folder: scoring its %s", path, years[0])
        return path / years[0]
    if years:
        raise ValueError(f"{path} holds {', '.join(years)}: say which to score, e.g. --voc-dir {path / years[0]}")
    raise FileNotFoundError(
        f"{path}: neither a VOC<year> folder (no Annotations/ or ImageSets/Main/) nor a VOCdevkit folder holding one"
    )


def _is_voc_year_folder(path: Path) -> bool:
    """What scoring reads from a ``VOC<year>`` folder is there (either part: a half-copied folder
    gets the precise "not found" of the part that is missing)."""
    return (path / "Annotations").is_dir() or (path / "ImageSets" / "Main").is_dir()


def _names(names: Sequence[str], shown: int = 10) -> str:
    """``a, b, c`` for a one-line message, cut after ``shown`` names."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f", ... ({more} more)" if more > 0 else "")


def _classes(args: argparse.Namespace, stated: str | None) -> list[str]:
    """The classes to score: --classes (or the run's, ``stated`` naming where from), else
    discovered. An error when the results folder holds no result file for the split, none for any
    of these classes (a mistyped --results, --split, --prefix or --classes would otherwise score a
    table of zeros), or none for some of them unless --allow-missing."""
    pattern = f"{args.prefix}_{args.split}_<class>.txt"
    present = result_classes(args.results, args.split, args.prefix)
    if not present:
        raise DevkitFormatError(
            f"{args.results} holds no {pattern} file: nothing to score (check --results, --split and --prefix)"
        )
    if args.classes is not None:
        classes = list(args.classes)
        if stated is not None:
            log.info("scoring %d classes from %s", len(classes), stated)
    else:
        found, source = discover_classes(args.voc_dir, present)
        classes = list(found)
        log.info("scoring %d classes from %s", len(classes), source)
    if not set(present) & set(classes):
        raise DevkitFormatError(
            f"{args.results}: the {pattern} files are for {_names(present, 5)}, none of the {len(classes)} "
            f"classes scored ({_names(classes, 5)}); give the right --classes"
        )
    missing = [name for name in classes if name not in set(present)]
    if missing:
        what = f"no {pattern} for {len(missing)} of {len(classes)} classes ({_names(missing)})"
        if not args.allow_missing:
            raise DevkitFormatError(
                f"{args.results}: {what}; a class without detections needs an empty file, or pass --classes "
                "with the classes to score, or --allow-missing to score them as without detections"
            )
        log.warning("%s: %s: scored as without detections (AP 0), as --allow-missing says", args.results, what)
    unused = sorted(set(present) - set(classes))
    if unused:
        log.warning("%s: result files of %d classes not scored: %s", args.results, len(unused), ", ".join(unused))
    return classes


def _configure_logging() -> None:
    """As a command: what it scores (info) on stdout above the table, warnings on stderr, so that
    an error leaves stderr its one line. Left alone when the caller configured logging (tests)."""
    root = logging.getLogger()
    if root.handlers:
        return
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("voc_eval: warning: %(message)s"))
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 on success, 2 on a user mistake (reported on one stderr line)."""
    args = _parse_args(argv)
    _configure_logging()
    try:
        stated = _from_run(args) if args.run is not None else None
        if args.split is None:
            args.split = DEFAULT_SPLIT
        args.voc_dir = resolve_voc_dir(args.voc_dir)
        classes = _classes(args, stated)
        gt = read_ground_truth(args.voc_dir, args.split, classes)
        log.info("ground truth: %s, split %s (%d images)", args.voc_dir, args.split, len(gt.image_ids))
        log.info("detections: %s", args.results)
        dets = read_detections(args.results, classes, args.split, gt.image_ids, args.prefix)
        result = evaluate_voc(gt, dets, classes, metric=args.metric)
        print(format_table(result))
        if args.json is not None:
            io.write_json(args.json, result.to_dict())
    except (OSError, ValueError, ReportedError) as err:
        log.debug("voc_eval failed", exc_info=True)
        print(f"voc_eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
