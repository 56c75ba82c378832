"""The official devkit's file formats: comp4 result files (both ways) and a split's ground truth.

Result files are what makes our numbers checkable by anyone with the official devkit, so writing
and reading them are exact inverses for everything the devkit sees: coordinates go through
cbn_detect.voc.boxes' VOC convention and every number is written with Python's shortest round-tripping
repr, so the scores and VOC-convention boxes read back are bit-identical to the ones scored in
memory (and hence the AP, score ties included). Only a continuous x1 or y1 can differ in its last
bits, because the file holds x1 + 1 and subtracting 1 again rounds for some doubles; adding 1 gives
back the written value exactly whenever x1 >= -0.5.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import numpy as np

from cbn_detect.runtime import io
from cbn_detect.voc import (
    VOC_CLASSES,
    Detections,
    GroundTruth,
    devkit_ground_truth,
    parse_annotation,
    unknown_classes,
    voc_to_xyxy,
    xyxy_to_voc,
)

log = logging.getLogger(__name__)

LINE_FORMAT = "<image_id> <score> <xmin> <ymin> <xmax> <ymax>"
DATASET_METADATA = "params.json"
"""A dataset's own description, two folders above its ``VOC<year>`` folder
(``<dataset>/VOCdevkit/VOC2007``), as the synthetic set writes it: its ``classes`` key lists the
class names in label order."""


class DevkitFormatError(ValueError):
    """A result file (or annotation) the evaluation cannot use; names the file and line."""


def detection_file(results_dir: Path, split: str, class_name: str, prefix: str = "comp4_det") -> Path:
    """The devkit's name for one class's result file, e.g. comp4_det_test_car.txt."""
    return Path(results_dir) / f"{prefix}_{split}_{class_name}.txt"


def write_detections(
    dets: Detections,
    class_names: Sequence[str],
    out_dir: Path,
    split: str,
    prefix: str = "comp4_det",
) -> list[Path]:
    """One comp4 file per class (empty ones too, so a file's absence never hides a bug), lines
    image by image in split order and, within an image, in array order: the order that breaks
    score ties in the devkit."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[list[str]] = [[] for _ in class_names]
    per_image = zip(dets.image_ids, dets.boxes, dets.scores, dets.labels)
    for image_id, boxes, scores, labels in per_image:
        if not image_id or len(image_id.split()) != 1 or image_id != image_id.strip():
            raise ValueError(f"image id {image_id!r} cannot be written: it must be one word")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > len(class_names)):
            raise ValueError(f"image {image_id}: detection labels must lie in 1..{len(class_names)}")
        # repr() of a Python float is the shortest text that parses back to the same double, so
        # float64 (and float32-derived) scores and the VOC coordinates survive exactly; the
        # devkit examples' "%f" would round scores to 6 decimals, invent ties and reorder them.
        scores = np.asarray(scores, np.float64)
        rows = zip(scores.tolist(), xyxy_to_voc(boxes).tolist(), labels.tolist())
        for score, (x1, y1, x2, y2), label in rows:
            lines[label - 1].append(f"{image_id} {score!r} {x1!r} {y1!r} {x2!r} {y2!r}\n")
    paths = []
    for name, class_lines in zip(class_names, lines):
        path = detection_file(out_dir, split, name, prefix)
        io.write_text(path, "".join(class_lines))
        paths.append(path)
    return paths


def read_detections(
    results_dir: Path,
    class_names: Sequence[str],
    split: str,
    image_ids: Sequence[str],
    prefix: str = "comp4_det",
) -> Detections:
    """Read comp4 files back, grouped per image in split order, file order kept within an image.

    A missing class file means no detections for that class, as in the devkit's own runs where a
    method skips classes. (``python -m cbn_detect.voc_eval`` refuses that unless told
    ``--allow-missing``: :func:`write_detections` writes every class's file, so a missing one is a
    lost or mistyped file far more often than a class without detections.)
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: results directory not found")
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    img: list[int] = []
    labels: list[np.ndarray] = []
    tables: list[np.ndarray] = [np.zeros((0, 5))]
    for label, name in enumerate(class_names, start=1):
        path = detection_file(results_dir, split, name, prefix)
        if path.is_file():
            file_img, file_table = _parse_result_file(path, index)
            img += file_img
            labels.append(np.full(len(file_img), label, dtype=np.int64))
            tables.append(file_table)
    if not labels:
        log.warning("%s holds no %s_%s_<class>.txt file: no detections", results_dir, prefix, split)

    img_arr = np.array(img, dtype=np.int64)
    table = np.concatenate(tables)
    label_arr = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    order = np.argsort(img_arr, kind="stable")  # stable: class by class, file order within
    bounds = np.searchsorted(img_arr[order], np.arange(1, len(image_ids)))
    per_image = np.split(order, bounds) if image_ids else []
    return Detections(
        image_ids=list(image_ids),
        boxes=[voc_to_xyxy(table[rows, 1:]) for rows in per_image],
        scores=[table[rows, 0].copy() for rows in per_image],
        labels=[label_arr[rows] for rows in per_image],
    )


def _parse_result_file(path: Path, index: dict[str, int]) -> tuple[list[int], np.ndarray]:
    """Image indices and (score, x1, y1, x2, y2) rows of one result file, in file order."""
    img: list[int] = []
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    with _utf8_text(path, f"a result file holds '{LINE_FORMAT}' lines") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{line_number}"
            if len(fields) != 6:
                raise DevkitFormatError(f"{where}: expected '{LINE_FORMAT}', got {line.strip()!r}")
            i = index.get(fields[0])
            if i is None:
                raise DevkitFormatError(f"{where}: image id {fields[0]!r} is not in the split")
            try:
                rows.append(list(map(float, fields[1:])))
            except ValueError:
                raise DevkitFormatError(f"{where}: expected numbers after the image id, got {line.strip()!r}") from None
            img.append(i)
            line_numbers.append(line_number)
    table = np.array(rows, dtype=np.float64).reshape(-1, 5)
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad.size:
        raise DevkitFormatError(f"{path}:{line_numbers[bad[0]]}: score and coordinates must be finite numbers")
    return img, table


@contextmanager
def _utf8_text(path: Path, expected: str) -> Iterator[TextIO]:
    """``path`` opened as UTF-8 text; bytes that are not UTF-8 (a binary file left among the result
    files, a file in another encoding) become a :class:`DevkitFormatError` naming the file and the
    line of the first bad byte, where Python's own error names neither. ``expected`` says what the
    file should hold."""
    try:
        with path.open(encoding="utf-8") as f:
            yield f
    except UnicodeDecodeError:
        # The text layer decodes ahead in chunks, so its error cannot say where: decode again whole.
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise DevkitFormatError(
                f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); {expected}"
            ) from None
        raise


def read_image_ids(voc_dir: Path, split: str) -> list[str]:
    """Image ids of ImageSets/Main/<split>.txt, whitespace-separated as the devkit's textread reads
    them."""
    path = Path(voc_dir) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    with _utf8_text(path, "a split file holds one image id per line") as f:
        return f.read().split()


def read_ground_truth(voc_dir: Path, split: str, class_names: Sequence[str]) -> GroundTruth:
    """The split's ground truth from Annotations/<id>.xml as the devkit reads it
    (devkit_ground_truth, as the in-run evaluation does): each object's own box and difficult
    flag, unclipped, in file order (the devkit breaks IoU ties by that order).

    An object whose class is not in class_names is an error rather than skipped: silently
    skipping would turn a wrong --classes into a table of classes without positives.
    """
    voc_dir = Path(voc_dir)
    if not voc_dir.is_dir():
        raise FileNotFoundError(f"{voc_dir}: VOC directory not found")
    annotations = []
    for image_id in read_image_ids(voc_dir, split):
        path = voc_dir / "Annotations" / f"{image_id}.xml"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: annotation of image {image_id!r} not found")
        annotation = parse_annotation(path)
        unknown = unknown_classes(annotation, class_names)
        if unknown:
            raise DevkitFormatError(
                f"{path}: class {', '.join(unknown)} not among the {len(class_names)} classes "
                "scored (use --classes for datasets other than VOC)"
            )
        annotations.append((image_id, annotation))
    return devkit_ground_truth(annotations, class_names)


def result_classes(results_dir: Path, split: str, prefix: str = "comp4_det") -> list[str]:
    """The classes that have a ``<prefix>_<split>_<class>.txt`` file in ``results_dir``, by name."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: results directory not found")
    head = f"{prefix}_{split}_"
    return sorted(
        path.name[len(head) : -len(".txt")]
        for path in results_dir.glob(f"{head}*.txt")
        if path.is_file() and len(path.name) > len(head) + len(".txt")
    )


def dataset_classes(voc_dir: Path) -> tuple[tuple[str, ...], Path] | None:
    """The class list a dataset states about itself (:data:`DATASET_METADATA`) and the file it came
    from, or None when the dataset states none (real VOC does not). A file of that name without a
    usable ``classes`` list is someone else's: ignored, with a warning."""
    path = Path(voc_dir).absolute().parent.parent / DATASET_METADATA
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (OSError, ValueError, AttributeError) as err:
        log.warning("%s ignored: not a dataset description (%s)", path, err)
        return None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        if classes is not None:
            log.warning("%s ignored: its 'classes' is not a list of class names", path)
        return None
    return tuple(classes), path


def discover_classes(voc_dir: Path, present: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """The classes to score, in label order, and where they came from, when the user names none:
    the dataset's own metadata; else, when the result files present (``present``, from
    :func:`result_classes`) name a class VOC does not have, those files' classes; else VOC's 20."""
    stated = dataset_classes(voc_dir)
    if stated is not None:
        return stated[0], str(stated[1])
    if present and not set(present) <= set(VOC_CLASSES):
        return tuple(present), "the result files present"
    return tuple(VOC_CLASSES), "VOC's 20 classes"
