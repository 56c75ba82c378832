"""VOC's classes and the data that crosses the evaluation boundary: a split's ground truth and
detections.

Both are per-image lists in split order rather than one flat table because the devkit breaks score
ties by file order (image by image, in split order), so that order is part of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 PASCAL VOC classes in the devkit's order; label k (1-based) is VOC_CLASSES[k - 1]."""


@dataclass
class GroundTruth:
    """One entry per image of the split, in split order.

    boxes are (n_i, 4) float64 continuous xyxy (see cbn_detect.voc.boxes), labels (n_i,) int64
    in 1..C, difficult (n_i,) bool. Objects keep their annotation-file order: the devkit breaks IoU
    ties by it. cbn_detect.voc.annotations.devkit_ground_truth builds it from annotation files.
    """

    image_ids: list[str]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    difficult: list[np.ndarray]


@dataclass
class Detections:
    """One entry per image, in the same order as the GroundTruth (an image may have none).

    boxes are (m_i, 4) float64 continuous xyxy, scores (m_i,) float64, labels (m_i,) int64 in 1..C.
    The order within an image matters: it is the file order that breaks score ties.
    """

    image_ids: list[str]
    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    labels: list[np.ndarray]
