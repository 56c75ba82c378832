"""Detection evaluation: devkit-exact VOC AP, devkit-format files, COCO-style AP.

Only light modules (numpy) are re-exported here, so importing cbn_detect.evaluation.types (as the
data package does) stays cheap; the torch-based evaluator is imported from its own module.
"""

from cbn_detect.evaluation.coco_metrics import COCO_KEYS, evaluate_coco
from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    read_detections,
    read_ground_truth,
    write_detections,
)
from cbn_detect.evaluation.types import VOC_CLASSES, Detections, GroundTruth
from cbn_detect.evaluation.voc_ap import METRICS, VOCResult, evaluate_voc

__all__ = [
    "COCO_KEYS",
    "METRICS",
    "VOC_CLASSES",
    "Detections",
    "DevkitFormatError",
    "GroundTruth",
    "VOCResult",
    "evaluate_coco",
    "evaluate_voc",
    "read_detections",
    "read_ground_truth",
    "write_detections",
]
