"""PASCAL VOC knowledge, the leaf under everything (numpy only): the classes, the GroundTruth and
Detections types, the +1 pixel box convention, annotation parsing with its two readings (as the
devkit reads it for evaluation, repaired for training) and the errors of reading a VOC folder."""

from cbn_detect.voc import errors
from cbn_detect.voc.annotations import (
    Annotation,
    VOCObject,
    devkit_ground_truth,
    object_labels,
    parse_annotation,
    repair_boxes,
    unknown_classes,
)
from cbn_detect.voc.boxes import voc_to_xyxy, xyxy_to_voc
from cbn_detect.voc.errors import DatasetError, DatasetNotFoundError, DatasetProblems
from cbn_detect.voc.types import VOC_CLASSES, Detections, GroundTruth

__all__ = [
    "VOC_CLASSES",
    "Annotation",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetProblems",
    "Detections",
    "GroundTruth",
    "VOCObject",
    "devkit_ground_truth",
    "errors",
    "object_labels",
    "parse_annotation",
    "repair_boxes",
    "unknown_classes",
    "voc_to_xyxy",
    "xyxy_to_voc",
]
