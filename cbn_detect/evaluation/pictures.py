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
from PIL import ImageDraw, ImageFont
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
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
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
        image_id: (
            voc_to_xyxy(np.array(image_boxes, np.float64).reshape(-1, 4)),
            np.array(image_scores, np.float64),
            np.array(image_labels, np.int64),
        )
        for image_id, (image_boxes, image_scores, image_labels) in wanted.items()
    }


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """A dataset image (uint8, or float in [0, 1] after the test transforms) as uint8 (3, H, W)."""
    image = image.as_subclass(torch.Tensor).detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image


def load_examples(
    dataset: Dataset,
    gt: GroundTruth,
    detections_dir: Path,
    split: str,
    class_names: Sequence[str],
    indices: Sequence[int],
    score: float = DEFAULT_SCORE,
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
        examples.append(
            Example(
                image_id=image_id,
                image=as_uint8(image),
                gt_boxes=np.asarray(gt.boxes[index], np.float64).reshape(-1, 4),
                gt_labels=np.asarray(gt.labels[index]),
                gt_difficult=np.asarray(gt.difficult[index], bool),
                boxes=boxes[keep],
                scores=scores[keep],
                labels=labels[keep],
            )
        )
    return examples


def class_color(label: int) -> str:
    """The colour of class ``label`` (1-based)."""
    return PALETTE[(label - 1) % len(PALETTE)]


Rect = tuple[int, int, int, int]
"""A label's place in pixels, (x0, y0, x1, y1) with x0 <= x < x1 and y0 <= y < y1."""

LABEL_PAD = 2
"""Pixels between a label's text and the edge of its filled background."""


def _intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: np.ndarray, sizes: Sequence[tuple[int, int]], width: int, height: int) -> list[Rect | None]:
    """Where each box's label (``sizes``: (w, h) in pixels) goes in a ``width`` x ``height`` picture,
    no two labels sharing a pixel, or None where there is no room.

    Greedy in the order given, so the caller puts the box that matters most first (the best
    detection): above the box, else inside its top, else below it, left-aligned with the box and
    kept inside the picture; where all three are taken, moved down from inside the top past the
    labels in the way until it fits, as long as it still touches its box (a label further away
    would name the wrong box), else left out. Crowded boxes otherwise stack their labels on one
    another and none can be read. Integer arithmetic only: the same boxes give the same picture.
    """
    placed: list[Rect] = []
    spots: list[Rect | None] = []
    for box, (w, h) in zip(np.asarray(boxes, np.float64).reshape(-1, 4), sizes):
        x = min(max(int(round(box[0])), 0), max(width - w, 0))
        top, bottom = int(round(box[1])), int(round(box[3]))
        spot = None
        for y in (top - h, top, bottom):  # above the box, inside its top, below it
            rect = (x, y, x + w, y + h)
            if y >= 0 and y + h <= height and not any(_intersects(rect, other) for other in placed):
                spot = rect
                break
        y = max(top, 0)
        while spot is None and y <= bottom and y + h <= height:  # never below the box: it must stay its label
            rect = (x, y, x + w, y + h)
            in_the_way = [other for other in placed if _intersects(rect, other)]
            if in_the_way:
                y = max(other[3] for other in in_the_way)  # below the lowest label in the way
            else:
                spot = rect
        if spot is not None:
            placed.append(spot)
        spots.append(spot)
    return spots


@dataclass
class Drawing:
    """A picture with its boxes, and where each box's label went (None: left out, no room)."""

    image: torch.Tensor
    labels: list[Rect | None]

    @property
    def unlabelled(self) -> int:
        return sum(spot is None for spot in self.labels)


def _label_font(font: str | None, font_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The TrueType ``font`` at ``font_size``, or PIL's default font (as torchvision's boxes use)."""
    return ImageFont.truetype(font, font_size) if font else ImageFont.load_default()


def draw_labelled(
    image: torch.Tensor,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    scores: np.ndarray | None = None,
    difficult: np.ndarray | None = None,
    side: int | None = DISPLAY_SIDE,
    font: str | None = None,
    font_size: int = 11,
) -> Drawing:
    """``image`` (uint8 (3, H, W)) scaled to ``side`` pixels on its longer side (None: as it is), with
    each box in its class's colour (torchvision's ``draw_bounding_boxes``) and its label, the class
    name and the score (``scores``) or ``(difficult)``, white on the class colour where
    :func:`place_labels` finds room, best score first. ``font``: a TrueType file (PIL's default font
    when None)."""
    image = as_uint8(image)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = 1.0
    if side is not None:
        scale = side / max(image.shape[-2:])
        size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
        image = TF.resize(image, size, antialias=True)
    if len(boxes) == 0:
        return Drawing(image, [])
    label_list = np.asarray(labels).tolist()
    names = []
    for i, label in enumerate(label_list):
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        if scores is not None:
            name += f" {float(scores[i]):.2f}"
        elif difficult is not None and bool(difficult[i]):
            name += " (difficult)"
        names.append(name)
    colors = [class_color(label) for label in label_list]
    height, width = image.shape[-2:]
    drawn = torch.from_numpy(boxes * scale).float()
    drawn[:, 0::2] = drawn[:, 0::2].clamp(0, width - 1)
    drawn[:, 1::2] = drawn[:, 1::2].clamp(0, height - 1)
    picture = TF.to_pil_image(draw_bounding_boxes(image, drawn, colors=colors, width=2))
    pen = ImageDraw.Draw(picture)
    typeface = _label_font(font, font_size)
    reference = pen.textbbox((0, 0), "Ag", font=typeface)  # one height for every label
    inks = []
    sizes = []
    for name in names:
        left, top, right, bottom = pen.textbbox((0, 0), name, font=typeface)
        top, bottom = min(top, reference[1]), max(bottom, reference[3])
        inks.append((left, top))
        sizes.append((right - left + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD))
    order = list(range(len(names)))
    if scores is not None:
        order.sort(key=lambda i: -float(scores[i]))  # stable: ties keep the given order
    spots = place_labels(drawn.numpy()[order], [sizes[i] for i in order], width, height)
    placed: list[Rect | None] = [None] * len(names)
    for i, spot in zip(order, spots):
        placed[i] = spot
    for name, color, spot, (left, top) in zip(names, colors, placed, inks):
        if spot is None:
            continue
        pen.rectangle((spot[0], spot[1], spot[2] - 1, spot[3] - 1), fill=color)
        pen.text((spot[0] + LABEL_PAD - left, spot[1] + LABEL_PAD - top), name, fill="white", font=typeface)
    return Drawing(TF.pil_to_tensor(picture), placed)


def draw_boxes(
    image: torch.Tensor, boxes: np.ndarray, labels: np.ndarray, class_names: Sequence[str], **kwargs: object
) -> torch.Tensor:
    """The picture of :func:`draw_labelled` (same arguments) without where its labels went."""
    return draw_labelled(image, boxes, labels, class_names, **kwargs).image


def draw_ground_truth(example: Example, class_names: Sequence[str], **kwargs: object) -> Drawing:
    return draw_labelled(
        example.image, example.gt_boxes, example.gt_labels, class_names, difficult=example.gt_difficult, **kwargs
    )


def draw_detections(example: Example, class_names: Sequence[str], **kwargs: object) -> Drawing:
    return draw_labelled(example.image, example.boxes, example.labels, class_names, scores=example.scores, **kwargs)


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
