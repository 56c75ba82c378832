"""Detection evaluation: devkit-exact VOC AP, devkit-format files, COCO-style AP.

Only light modules (numpy) are re-exported here; the torch-based evaluator is imported from its
own module. The types scored here (GroundTruth, Detections) and the classes live in cbn_detect.voc.
"""

from cbn_detect.evaluation.coco_metrics import COCO_KEYS, evaluate_coco
from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    read_detections,
    read_ground_truth,
    write_detections,
)
from cbn_detect.evaluation.voc_ap import METRICS, VOCResult, evaluate_voc

__all__ = [
    "COCO_KEYS",
    "METRICS",
    "DevkitFormatError",
    "VOCResult",
    "evaluate_coco",
    "evaluate_voc",
    "read_detections",
    "read_ground_truth",
    "write_detections",
]
