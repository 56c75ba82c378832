"""Pictures of detections: a few test images with their ground truth and a detector's boxes.

The detections come from a job's devkit files (``comp4_det_<split>_<class>.txt``, what every
evaluation writes), the images and the ground truth from its test split, so a picture needs no
model: the report draws them for a finished sweep, the training run sends the same images to W&B
after each evaluation. The images are the first ``count`` of the split that hold an object that is
not difficult, so every picture of a sweep shows the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from cbn_detect.data.build import build_dataset
from cbn_detect.evaluation.devkit_io import DevkitFormatError, detection_file
from cbn_detect.voc import GroundTruth, voc_to_xyxy

DEFAULT_IMAGES = 4
DEFAULT_SCORE = 0.3
"""Detections drawn from this score up. The tiny RetinaNet's true positives on the synthetic set
mostly score 0.3-0.8 and its false positives below 0.3; W&B's viewer has its own score slider."""

DISPLAY_SIDE = 320
"""Pictures are scaled to this longer side before the boxes are drawn, so that labels stay legible
on 128-pixel synthetic images and VOC's 500-pixel ones look alike."""

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
    "#e6550d", "#31a354", "#756bb1", "#636363",
)
"""One colour per class (matplotlib's tab10, then darker tab20b/c shades): a class keeps its colour
in every picture."""


@dataclass
class Example:
    """One test image (uint8, (3, H, W)) with its ground truth and detections in image coordinates
    (float xyxy); detections above the score threshold, best first; labels in 1..C."""

    image_id: str
    image: torch.Tensor
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def pick_images(gt: GroundTruth, count: int) -> list[int]:
    """Indices of the first ``count`` images of the split with an object that is not difficult (the
    first images of all when too few have one), in split order."""
    has_object = [bool((~np.asarray(difficult, bool)).any()) for difficult in gt.difficult]
    order = [i for i, yes in enumerate(has_object) if yes] + [i for i, yes in enumerate(has_object) if not yes]
    return sorted(order[: max(count, 0)])


def read_image_detections(
    results_dir: Path, split: str, class_names: Sequence[str], image_ids: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes, scores, labels) of ``image_ids`` from the devkit files in ``results_dir``, reading only
    those images' lines (a VOC-sized split has half a million lines). A missing class file holds no
    detections, as in :func:`devkit_io.read_detections`."""
    wanted = {image_id: ([], [], []) for image_id in image_ids}
    for label, name in enumerate(class_names, start=1):
        path = detection_file(results_dir, split, name)
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                fields = line.split()
                if not fields or fields[0] not in wanted:
                    continue
                try:
                    score, *box = map(float, fields[1:])
                except ValueError:
                    raise DevkitFormatError(f"{path}:{line_number}: expected numbers, got {line.strip()!r}") from None
                if len(box) != 4:
                    raise DevkitFormatError(f"{path}:{line_number}: expected 6 fields, got {line.strip()!r}")
                boxes, scores, labels = wanted[fields[0]]
                boxes.append(box)
                scores.append(score)
                labels.append(label)
    return {
        image_id: (voc_to_xyxy(np.array(b, np.float64).reshape(-1, 4)), np.array(s, np.float64), np.array(l, np.int64))
        for image_id, (b, s, l) in wanted.items()
    }


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """A dataset image (uint8, or float in [0, 1] after the test transforms) as uint8 (3, H, W)."""
    image = image.as_subclass(torch.Tensor).detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image


def load_examples(
    dataset: Dataset, gt: GroundTruth, detections_dir: Path, split: str, class_names: Sequence[str],
    indices: Sequence[int], score: float = DEFAULT_SCORE,
) -> list[Example]:
    """The images at ``indices`` of the test split (``dataset`` and ``gt`` in the same split order,
    as the evaluation uses them) with the detections of ``detections_dir`` scoring at least ``score``."""
    ids = [gt.image_ids[i] for i in indices]
    found = read_image_detections(Path(detections_dir), split, class_names, ids)
    examples = []
    for index, image_id in zip(indices, ids):
        image, target = dataset[index]
        if str(target["image_id"]) != image_id:
            raise ValueError(f"the dataset's image {index} is {target['image_id']}, the ground truth's {image_id}")
        boxes, scores, labels = found[image_id]
        keep = np.flatnonzero(scores >= score)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        examples.append(Example(
            image_id=image_id, image=as_uint8(image),
            gt_boxes=np.asarray(gt.boxes[index], np.float64).reshape(-1, 4), gt_labels=np.asarray(gt.labels[index]),
            gt_difficult=np.asarray(gt.difficult[index], bool),
            boxes=boxes[keep], scores=scores[keep], labels=labels[keep],
        ))
    return examples


def class_color(label: int) -> str:
    """The colour of class ``label`` (1-based)."""
    return PALETTE[(label - 1) % len(PALETTE)]


def draw_boxes(
    image: torch.Tensor, boxes: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
    scores: np.ndarray | None = None, difficult: np.ndarray | None = None, side: int | None = DISPLAY_SIDE,
    font: str | None = None, font_size: int = 11,
) -> torch.Tensor:
    """``image`` (uint8 (3, H, W)) scaled to ``side`` pixels on its longer side (None: as it is), with
    each box in its class's colour, labelled with the class name and the score (``scores``) or
    ``(difficult)``. ``font``: a TrueType file (PIL's small bitmap font when None)."""
    image = as_uint8(image)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = 1.0
    if side is not None:
        scale = side / max(image.shape[-2:])
        size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
        image = TF.resize(image, size, antialias=True)
    if len(boxes) == 0:
        return image
    names = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        if scores is not None:
            name += f" {float(scores[i]):.2f}"
        elif difficult is not None and bool(difficult[i]):
            name += " (difficult)"
        names.append(name)
    colors = [class_color(label) for label in np.asarray(labels).tolist()]
    height, width = image.shape[-2:]
    drawn = torch.from_numpy(boxes * scale).float()
    drawn[:, 0::2] = drawn[:, 0::2].clamp(0, width - 1)
    drawn[:, 1::2] = drawn[:, 1::2].clamp(0, height - 1)
    return draw_bounding_boxes(
        image, drawn, labels=names, colors=colors, width=2, font=font, font_size=font_size if font else None,
        fill_labels=True, label_colors="white",
    )


def draw_ground_truth(example: Example, class_names: Sequence[str], **kwargs: object) -> torch.Tensor:
    return draw_boxes(
        example.image, example.gt_boxes, example.gt_labels, class_names, difficult=example.gt_difficult, **kwargs
    )


def draw_detections(example: Example, class_names: Sequence[str], **kwargs: object) -> torch.Tensor:
    return draw_boxes(example.image, example.boxes, example.labels, class_names, scores=example.scores, **kwargs)


@dataclass
class SplitData:
    """A job's test split as its evaluation saw it: dataset and ground truth in split order."""

    dataset: Dataset
    gt: GroundTruth
    classes: tuple[str, ...]
    split: str


def job_test_split(job_dir: Path, cache: dict[str, SplitData] | None = None) -> SplitData:
    """The test split of the job in ``job_dir``, from the data config its ``.hydra/config.yaml``
    records (built once per distinct data config when a ``cache`` is passed). Interpolations such as
    the synthetic set's ``${oc.env:CBN_DETECT_CACHE,...}`` resolve in this process's environment."""
    cfg = OmegaConf.load(Path(job_dir) / ".hydra" / "config.yaml")
    data = OmegaConf.select(cfg, "data")
    if data is None or OmegaConf.select(data, "source") is None:
        raise ValueError(f"{job_dir}/.hydra/config.yaml names no dataset (data.source)")
    key = OmegaConf.to_yaml(data)
    if cache is not None and key in cache:
        return cache[key]
    dataset = build_dataset(data, train=False)
    found = SplitData(dataset, dataset.ground_truth(), tuple(dataset.classes), str(data.test_split))
    if cache is not None:
        cache[key] = found
    return found
