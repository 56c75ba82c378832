"""Score devkit-format result files (ours or anyone's) against a VOC split, as the devkit would.

    python -m cbn_detect.voc_eval --voc-dir .../VOCdevkit/VOC2007 --split test --results DIR \
        [--metric voc07|area] [--json FILE] [--classes a,b,c]

Prints a per-class table and the mAP; --json writes {"metric", "mAP", "ap": {class: AP}} with AP
as fractions (null for a class without positives). A missing class file means no detections, but a
results folder without any file for the split is an error (a mistyped --results or --split).

Without --classes the class list comes from the dataset itself (the synthetic set's params.json),
else from the result files present when they name a class VOC does not have, else VOC's 20.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    discover_classes,
    read_detections,
    read_ground_truth,
    result_classes,
)
from cbn_detect.evaluation.voc_ap import METRICS, VOCResult, evaluate_voc
from cbn_detect.runtime import io

log = logging.getLogger(__name__)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cbn_detect.voc_eval",
        description="Score comp4_det_<split>_<class>.txt detection files (ours or anyone's) against a "
        "VOC-layout split by the official VOC devkit's rules; prints AP per class and the mAP.",
    )
    parser.add_argument("--voc-dir", type=Path, required=True, help=".../VOCdevkit/VOC2007")
    parser.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    parser.add_argument("--results", type=Path, required=True, help="folder of result files")
    parser.add_argument("--metric", choices=METRICS, default="voc07", help="default voc07")
    parser.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    parser.add_argument(
        "--classes",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=None,
        help="comma-separated class names in label order (default: the dataset's own list, e.g. the "
        "synthetic set's params.json; else the result files' classes when they are not VOC's; else "
        "the 20 VOC classes)",
    )
    parser.add_argument("--prefix", default="comp4_det", help="result file prefix (comp4_det)")
    return parser.parse_args(argv)


def format_table(result: VOCResult) -> str:
    """Per-class AP in percent, as papers print them, then the mAP."""
    width = max(len("class"), *(len(name) for name in result.ap))
    lines = [f"{'class':<{width}}  {'positives':>9}  {'AP (%)':>8}"]
    for name, ap in result.ap.items():
        shown = f"{'n/a':>8}  (no positives)" if ap is None else f"{100 * ap:8.2f}"
        lines.append(f"{name:<{width}}  {result.n_pos[name]:>9}  {shown}")
    lines.append(f"{'mAP':<{width}}  {'':>9}  {100 * result.map:8.2f}  ({result.metric})")
    return "\n".join(lines)


def _classes(args: argparse.Namespace) -> list[str]:
    """The classes to score: --classes, else discovered; an error when the results folder holds no
    result file for the split, or none for any of these classes (a mistyped --results, --split,
    --prefix or --classes would otherwise score a table of zeros)."""
    pattern = f"{args.prefix}_{args.split}_<class>.txt"
    present = result_classes(args.results, args.split, args.prefix)
    if not present:
        raise DevkitFormatError(
            f"{args.results} holds no {pattern} file: nothing to score (check --results, --split and --prefix)"
        )
    if args.classes is not None:
        classes = list(args.classes)
    else:
        found, source = discover_classes(args.voc_dir, present)
        classes = list(found)
        log.info("scoring %d classes from %s", len(classes), source)
    if not set(present) & set(classes):
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise DevkitFormatError(
            f"{args.results}: the {pattern} files are for {shown}, none of the {len(classes)} classes scored "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); give the right --classes"
        )
    unused = sorted(set(present) - set(classes))
    if unused:
        log.warning("%s: result files of %d classes not scored: %s", args.results, len(unused), ", ".join(unused))
    return classes


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 on success, 2 on a user mistake (reported on one stderr line)."""
    args = _parse_args(argv)
    try:
        if not args.voc_dir.is_dir():
            raise FileNotFoundError(f"{args.voc_dir}: VOC directory not found")
        classes = _classes(args)
        gt = read_ground_truth(args.voc_dir, args.split, classes)
        dets = read_detections(args.results, classes, args.split, gt.image_ids, args.prefix)
        result = evaluate_voc(gt, dets, classes, metric=args.metric)
        print(format_table(result))
        if args.json is not None:
            io.write_json(args.json, result.to_dict())
    except (OSError, ValueError) as err:
        log.debug("voc_eval failed", exc_info=True)
        print(f"voc_eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
