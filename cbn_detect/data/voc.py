"""PASCAL VOC detection data: one split of one `VOCdevkit/VOC<year>` folder.

All annotations are parsed at construction (a few seconds for all of VOC): bad files then surface
before training starts, and the evaluator gets the ground truth without decoding a single image.
Boxes leave this module in the code's continuous xyxy convention (see cbn_detect.voc.boxes).
Training targets are repaired (boxes clipped to the image, empty ones dropped); the evaluation
ground truth is not: it is the annotation as the official devkit reads it (see
cbn_detect.voc.annotations).

Image integrity. Decoding every JPEG at construction would cost about a minute on VOC's 10k
images at every start, so by default (verify_images="header") construction only opens each
image's header: that finds missing, empty, non-JPEG and header-damaged files and size mismatches
with the XML, in well under a second per thousand images. A JPEG truncated in its pixel data
passes that check and fails when __getitem__ decodes it, with a DatasetError naming the file.
verify_images="full" decodes everything at construction; `python -m cbn_detect.data.check` does
that once per dataset, so a run can trust the cheap check afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from cbn_detect.runtime.errors import ConfigError
from cbn_detect.voc import (
    VOC_CLASSES,
    Annotation,
    DatasetError,
    DatasetNotFoundError,
    DatasetProblems,
    GroundTruth,
    devkit_ground_truth,
    errors,
    object_labels,
    parse_annotation,
    repair_boxes,
    unknown_classes,
)

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
VerifyImages = Literal["header", "full"]
Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]

_LAYOUT = ("Annotations", "JPEGImages", "ImageSets/Main")
_VOC_YEAR = re.compile(r"VOC\d{4}")
_logged_roots: set[Path] = set()
"""The VOC folders whose use was logged: a run reads the same one for training and testing."""


def resolve_voc_root(root: str | Path, year: str | int | None = None) -> Path:
    """The `VOC<year>` folder for `root`: a VOCdevkit folder plus `year`, or that folder itself
    (data.root may name either, as voc_eval's --voc-dir may). Logged once per folder.

    A `root` that is another year's folder (data.root=.../VOCdevkit/VOC2007 while data=voc0712 also
    needs VOC2012) stands for its VOCdevkit: the year's sibling folder is used when it is there,
    and its absence is an error naming data.root. Taking `root` itself there, as any other folder
    with the VOC layout is taken, would silently train on VOC2007 twice."""
    root = Path(root).expanduser()
    candidates = [root] if year is None else [root / f"VOC{year}", root]
    if year is not None and _VOC_YEAR.fullmatch(root.name) and root.name != f"VOC{year}":
        sibling = root.parent / f"VOC{year}"
        if not all((sibling / part).is_dir() for part in _LAYOUT):
            raise DatasetNotFoundError(
                f"data.root={root} is the {root.name} folder, but VOC{year} is needed too and "
                f"{sibling} is no VOC folder: set data.root to the VOCdevkit folder that holds "
                f"{root.name}/ and VOC{year}/"
            )
        candidates = [sibling]
    for candidate in candidates:
        if all((candidate / part).is_dir() for part in _LAYOUT):
            if candidate not in _logged_roots:
                _logged_roots.add(candidate)
                log.info("reading VOC data from %s", candidate.absolute())
            return candidate
    looked = "; ".join(f"{c}/{{{','.join(_LAYOUT)}}}{'' if c.is_dir() else ' (no such folder)'}" for c in candidates)
    raise DatasetNotFoundError(
        f"PASCAL VOC{'' if year is None else ' ' + str(year)} not found: looked for {looked}. "
        "Download VOC and set data.root to the VOCdevkit folder that holds VOC2007/ (and VOC2012/ "
        "for voc0712), e.g. data.root=/datasets/VOCdevkit; or run with data=synthetic, which "
        "generates its own small VOC-format dataset and needs no download."
    )


@dataclasses.dataclass(frozen=True)
class _Record:
    """One image's cached annotation, as written (for evaluation), and its training targets
    (boxes clipped, empty ones dropped, continuous xyxy)."""

    image_id: str
    image_path: Path
    annotation: Annotation
    boxes: np.ndarray  # (n, 4) float64
    labels: np.ndarray  # (n,) int64, 1..C
    difficult: np.ndarray  # (n,) bool


class VOCDataset(Dataset):
    """One split (`ImageSets/Main/<split>.txt`) of a VOC folder, as (image, target) pairs.

    `image` is a uint8 RGB tv_tensors.Image (C, H, W); `target` holds `boxes`
    (tv_tensors.BoundingBoxes, float32 continuous XYXY), `labels` (int64, classes.index(name) + 1,
    so 0 stays free for background), `difficult` (bool), `image_id` (str) and `orig_size` (H, W).
    Images without objects are kept as negatives. In the targets, boxes reaching outside the image
    are clipped and boxes with no area left are dropped; both are counted in `problems`, in either
    mode. ground_truth() (for evaluation) repairs nothing.

    on_error="raise" stops at the first bad image with a DatasetError naming the file;
    on_error="skip" leaves bad images out and counts them in `problems`. A missing or empty split
    file raises in both modes: skipping it would leave nothing to train on.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Sequence[str] = VOC_CLASSES,
        keep_difficult: bool = True,
        transforms: Transforms | None = None,
        on_error: OnError = "raise",
        *,
        year: str | int | None = None,
        verify_images: VerifyImages = "header",
        cache_images: bool = False,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={on_error!r} must be 'raise' or 'skip'")
        if verify_images not in ("header", "full"):
            raise ConfigError(f"verify_images must be 'header' or 'full', got {verify_images!r}")
        self.root = resolve_voc_root(root, year)
        self.split = split
        self.classes = tuple(classes)
        self.keep_difficult = keep_difficult
        self.transforms = transforms
        self.on_error = on_error
        self.verify_images = verify_images
        self.problems = DatasetProblems(split=f"{self.root.name}/{split}")
        self._records = self._load_split()
        # Decoded images by index when cache_images: a small set (the synthetic one, 24 MB) is then
        # decoded once per process instead of once per epoch. Each loader worker holds its own.
        self._decoded: dict[int, torch.Tensor] | None = {} if cache_images else None
        self.problems.num_images = len(self._records)
        self.problems.num_negatives = sum(len(r.labels) == 0 for r in self._records)
        if self.problems:
            log.warning("problems in %s:\n%s", self.root, self.problems.summary())

    @property
    def ids(self) -> list[str]:
        """Image ids in split-file order (bad ones left out under on_error="skip")."""
        return [r.image_id for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        record = self._records[index]
        image = self._image(index, record.image_path)
        keep = slice(None) if self.keep_difficult else ~record.difficult
        size = (record.annotation.height, record.annotation.width)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(record.boxes[keep], dtype=torch.float32).reshape(-1, 4),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=size,
            ),
            "labels": torch.tensor(record.labels[keep], dtype=torch.int64),
            "difficult": torch.tensor(record.difficult[keep], dtype=torch.bool),
            "image_id": record.image_id,
            "orig_size": size,
        }
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def _image(self, index: int, path: Path) -> tv_tensors.Image:
        if self._decoded is None:
            return _decode_rgb(path)
        cached = self._decoded.get(index)
        if cached is None:
            cached = self._decoded[index] = _decode_rgb(path)
        return cached.clone()  # the transforms get a copy of their own: the cache never changes

    def ground_truth(self) -> GroundTruth:
        """The split's evaluation ground truth, without decoding images: every annotation as the
        official devkit reads it (devkit_ground_truth, as voc_eval does), so boxes past the image
        edge are not clipped and empty ones not dropped, whatever the training targets hold.

        Difficult objects are always included (flagged), whatever keep_difficult says: the VOC
        metric needs them to ignore detections that match them.
        """
        annotations = ((r.image_id, r.annotation) for r in self._records)
        return devkit_ground_truth(annotations, self.classes)

    def _load_split(self) -> list[_Record]:
        records = []
        for image_id in self._read_split_file():
            try:
                records.append(self._load_record(image_id))
            except DatasetError as err:
                if self.on_error == "raise" or err.kind is None:
                    raise
                log.debug("skipping %s: %s", image_id, err)
                self.problems.add(err.kind, str(err))
        if not records:
            raise DatasetError(f"{self.root}: no usable image in split {self.split!r}:\n{self.problems.summary()}")
        return records

    def _read_split_file(self) -> list[str]:
        path = self.root / "ImageSets" / "Main" / f"{self.split}.txt"
        if not path.is_file():
            available = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)
            raise DatasetError(f"{path}: split file not found; splits here: {available}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path}: split file is not text ({err.reason})") from err
        ids: list[str] = []
        seen: dict[str, int] = {}
        for line_number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            if len(text.split()) != 1 or text in seen:
                why = f"duplicate of line {seen[text]}" if text in seen else "expected one image id per line"
                self._problem(errors.BAD_SPLIT_LINE, f"{path}:{line_number}: {why}: {text!r}")
                continue
            seen[text] = line_number
            ids.append(text)
        if not ids:
            raise DatasetError(f"{path}: split file lists no image ids")
        return ids

    def _load_record(self, image_id: str) -> _Record:
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DatasetError(
                f"{xml_path}: no annotation for image id {image_id!r} listed in split {self.split!r}",
                errors.MISSING_ANNOTATION,
            )
        annotation = parse_annotation(xml_path)
        unknown = unknown_classes(annotation, self.classes)
        if unknown:
            raise DatasetError(
                f"{xml_path}: unknown class {', '.join(map(repr, unknown))}; known classes: {', '.join(self.classes)}",
                errors.UNKNOWN_CLASS,
            )
        image_path = self.root / "JPEGImages" / f"{image_id}.jpg"
        self._check_image(image_path, xml_path, (annotation.width, annotation.height))
        boxes, keep = self._repair_boxes(annotation, xml_path)
        return _Record(
            image_id=image_id,
            image_path=image_path,
            annotation=annotation,
            boxes=boxes[keep],
            labels=object_labels(annotation, self.classes)[keep],
            difficult=np.array([o.difficult for o in annotation.objects], dtype=bool)[keep],
        )

    def _check_image(self, image_path: Path, xml_path: Path, size: tuple[int, int]) -> None:
        if not image_path.is_file():
            raise DatasetError(f"{image_path}: image missing for annotation {xml_path}", errors.MISSING_IMAGE)
        try:
            with Image.open(image_path) as image:
                found = image.size
                if self.verify_images == "full":
                    image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(f"{image_path}: corrupt image ({err})", errors.CORRUPT_IMAGE) from err
        if found != size:
            raise DatasetError(
                f"{image_path}: image is {found[0]}x{found[1]} (WxH) but {xml_path} says {size[0]}x{size[1]}",
                errors.SIZE_MISMATCH,
            )

    def _repair_boxes(self, annotation: Annotation, xml_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The training targets' boxes, clipped, and which to keep (repair_boxes); counts both."""
        boxes, clipped, keep = repair_boxes(annotation)
        for i, obj in enumerate(annotation.objects):
            where = f"{xml_path} (object {i + 1}, {obj.name}, bbox {obj.bbox})"
            if not keep[i]:
                self.problems.add(errors.BOX_DROPPED, where)
            elif clipped[i]:
                self.problems.add(errors.BOX_CLIPPED, where)
        return boxes, keep

    def _problem(self, kind: str, message: str) -> None:
        """Raise under on_error="raise"; count under "skip"."""
        if self.on_error == "raise":
            raise DatasetError(message, kind)
        self.problems.add(kind, message)


def _decode_rgb(path: Path) -> tv_tensors.Image:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"{path}: corrupt image ({err}); `python -m cbn_detect.data.check` finds all such "
            "files, and verify_images='full' with on_error='skip' leaves them out",
            errors.CORRUPT_IMAGE,
        ) from err
    return tv_tensors.Image(TF.pil_to_tensor(rgb))
