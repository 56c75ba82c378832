"""VOC annotation files: the parser, and the two readings of what it returns.

The same file is read two ways, on purpose:
- evaluation: `devkit_ground_truth` takes every object exactly as written, as the official devkit
  (VOCevaldet.m) does: a box reaching past the image edge keeps its coordinates, a box with no
  area stays. The in-run evaluation (VOCDataset.ground_truth) and `python -m cbn_detect.voc_eval`
  (cbn_detect.evaluation.devkit_io.read_ground_truth) both go through it, so the same detection
  files get the same AP from both.
- training: `repair_boxes` clips boxes to the image and marks those with no area left, to be
  dropped; the dataset applies it to training targets only, and counts both repairs.
"""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cbn_detect.voc import errors
from cbn_detect.voc.boxes import voc_to_xyxy
from cbn_detect.voc.errors import DatasetError
from cbn_detect.voc.types import GroundTruth

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class VOCObject:
    """One <object>: its class name, difficult flag and own box, 1-based inclusive VOC pixels
    (xmin, ymin, xmax, ymax) exactly as written."""

    name: str
    difficult: bool
    bbox: Box


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotation file: the image's file name and size, its objects in file order."""

    filename: str
    width: int
    height: int
    objects: tuple[VOCObject, ...]

    @property
    def boxes(self) -> np.ndarray:
        """(n, 4) float64 continuous xyxy of the objects as written: none clipped, none dropped."""
        return voc_to_xyxy(np.array([o.bbox for o in self.objects], dtype=np.float64))


def parse_annotation(path: Path) -> Annotation:
    """Read one VOC XML file into plain Python values, coordinates exactly as written.

    Only an object's own <bndbox> is read: VOC persons also carry <part> elements (head, hands,
    feet) with nested boxes that are not objects. A missing <difficult> means 0 (VOC2012 omits it
    for some objects); coordinates are parsed as floats (VOC2012 has some like 273.5).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        raise DatasetError(
            f"{path}:{line}:{column}: malformed annotation XML ({err})", errors.MALFORMED_ANNOTATION
        ) from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read annotation ({err.strerror})", errors.MISSING_ANNOTATION) from err

    size = _child(root, "size", path)
    width, height = (_number(size, tag, path) for tag in ("width", "height"))
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise DatasetError(
            f"{path}: image size must be positive integers, got width={width} height={height}",
            errors.MALFORMED_ANNOTATION,
        )
    objects = []
    for obj in root.findall("object"):
        name = (_child(obj, "name", path).text or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DatasetError(
                f"{path}: object {name!r}: <difficult> must be 0 or 1, got {difficult!r}",
                errors.MALFORMED_ANNOTATION,
            )
        bndbox = _child(obj, "bndbox", path)
        bbox = tuple(_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VOCObject(name=name, difficult=difficult == "1", bbox=bbox))
    return Annotation(
        filename=root.findtext("filename") or f"{path.stem}.jpg",
        width=int(width),
        height=int(height),
        objects=tuple(objects),
    )


def _child(parent: ET.Element, tag: str, path: Path) -> ET.Element:
    found = parent.find(tag)
    if found is None:
        raise DatasetError(f"{path}: <{parent.tag}> has no <{tag}>", errors.MALFORMED_ANNOTATION)
    return found


def _number(parent: ET.Element, tag: str, path: Path) -> float:
    text = _child(parent, tag, path).text
    try:
        value = float(text or "")
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{path}: <{parent.tag}><{tag}> is not a number: {text!r}", errors.MALFORMED_ANNOTATION)
    return value


def unknown_classes(annotation: Annotation, classes: Sequence[str]) -> list[str]:
    """The annotation's class names not in `classes`, sorted; each reader reports them its way."""
    return sorted({o.name for o in annotation.objects} - set(classes))


def object_labels(annotation: Annotation, classes: Sequence[str]) -> np.ndarray:
    """(n,) int64 labels in file order: classes.index(name) + 1, so 0 stays free for background.
    Every name must be in `classes` (check with unknown_classes first)."""
    label_of: dict[str, int] = {}
    for k, name in enumerate(classes, start=1):
        label_of.setdefault(name, k)
    return np.array([label_of[o.name] for o in annotation.objects], dtype=np.int64)


def devkit_ground_truth(annotations: Iterable[tuple[str, Annotation]], classes: Sequence[str]) -> GroundTruth:
    """The evaluation ground truth of (image id, annotation) pairs in split order, as the devkit
    reads it: every object's own box unclipped (none dropped) and its difficult flag, in file order
    (the devkit breaks IoU ties by that order). The one reader behind both the in-run evaluation
    and voc_eval."""
    gt = GroundTruth(image_ids=[], boxes=[], labels=[], difficult=[])
    for image_id, annotation in annotations:
        gt.image_ids.append(image_id)
        gt.boxes.append(annotation.boxes)
        gt.labels.append(object_labels(annotation, classes))
        gt.difficult.append(np.array([o.difficult for o in annotation.objects], dtype=bool))
    return gt


def repair_boxes(annotation: Annotation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training targets' repair rules: every box clipped to the image, continuous xyxy.

    Returns (boxes, clipped, keep): the clipped (n, 4) float64 boxes, which of them clipping
    changed, and which have area left (the others are to be dropped). Evaluation never applies
    these rules (see devkit_ground_truth).
    """
    width, height = annotation.width, annotation.height
    raw = annotation.boxes
    boxes = raw.clip(0.0, [width, height, width, height])
    clipped = (boxes != raw).any(axis=1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, clipped, keep
