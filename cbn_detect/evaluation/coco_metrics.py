"""COCO-style box AP of a VOC split, through pycocotools (the reference) or faster-coco-eval.

VOC ground truth is converted in memory: continuous xyxy boxes become xywh, difficult objects
become crowd regions (iscrowd=1), which COCOeval ignores as VOC ignores difficult objects (with
COCO's own rule for matching them: intersection over the detection's area). The numbers are COCO's
101-point AP; AP50 is therefore not VOC AP at IoU 0.5.

faster-coco-eval gives identical numbers about 5x faster on a VOC07-test-sized problem, so it is
used when installed; `reference=True` forces pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbn_detect.voc import Detections, GroundTruth

COCO_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six entries of COCOeval.stats, in its order."""

# COCOeval's area ranges for the six keys (bounds inclusive, areas in pixels squared).
_AREA_RANGES = {
    "AP": (0.0, 1e10),
    "AP50": (0.0, 1e10),
    "AP75": (0.0, 1e10),
    "APs": (0.0, 32.0**2),
    "APm": (32.0**2, 96.0**2),
    "APl": (96.0**2, 1e10),
}


def faster_coco_eval_available() -> bool:
    """Whether the fast backend imports (a broken install counts as absent)."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate_coco(
    gt: GroundTruth, dets: Detections, class_names: Sequence[str], reference: bool = False
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl as fractions; NaN where COCOeval has nothing to average
    (its -1, e.g. APs without small objects)."""
    if list(dets.image_ids) != list(gt.image_ids):
        raise ValueError("detections and ground truth must list the same images in the same order")
    gt_dict = coco_ground_truth(gt, class_names)
    results = coco_results(dets)
    if not results:
        return _without_detections(gt_dict)
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print progress
        if reference or not faster_coco_eval_available():
            stats = _pycocotools_stats(gt_dict, results)
        else:
            stats = _faster_coco_eval_stats(gt_dict, results)
    return {key: (math.nan if v == -1 else float(v)) for key, v in zip(COCO_KEYS, stats)}


def coco_ground_truth(gt: GroundTruth, class_names: Sequence[str]) -> dict[str, Any]:
    """A COCO instances dict; image ids are 1-based positions in the split, category ids the
    1-based labels."""
    annotations = []
    for img, (boxes, labels, difficult) in enumerate(zip(gt.boxes, gt.labels, gt.difficult), 1):
        xyxy = np.asarray(boxes, np.float64).reshape(-1, 4).tolist()
        for (x1, y1, x2, y2), label, crowd in zip(xyxy, labels.tolist(), difficult.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img,
                    "category_id": label,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
    return {
        "images": [{"id": i, "file_name": image_id} for i, image_id in enumerate(gt.image_ids, 1)],
        "categories": [{"id": k, "name": name} for k, name in enumerate(class_names, 1)],
        "annotations": annotations,
    }


def coco_results(dets: Detections) -> list[dict[str, Any]]:
    """COCO's detection-results list, image ids as in coco_ground_truth."""
    results = []
    for img, (boxes, scores, labels) in enumerate(zip(dets.boxes, dets.scores, dets.labels), 1):
        xyxy = np.asarray(boxes, np.float64).reshape(-1, 4).tolist()
        for (x1, y1, x2, y2), score, label in zip(xyxy, scores.tolist(), labels.tolist()):
            bbox = [x1, y1, x2 - x1, y2 - y1]
            results.append({"image_id": img, "category_id": label, "bbox": bbox, "score": score})
    return results


def _pycocotools_stats(gt_dict: dict[str, Any], results: list[dict[str, Any]]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt_dict
    coco_gt.createIndex()
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return np.asarray(coco_eval.stats[: len(COCO_KEYS)])


def _faster_coco_eval_stats(gt_dict: dict[str, Any], results: list[dict[str, Any]]) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    # It reports progress and the whole summary table through logging at INFO, once per evaluation.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    coco_gt = COCO(gt_dict)
    coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    coco_eval.run()
    return np.asarray(coco_eval.stats[: len(COCO_KEYS)])


def _without_detections(gt_dict: dict[str, Any]) -> dict[str, float]:
    """COCOeval's answer for an empty result list, which pycocotools cannot load: 0 wherever some
    non-crowd object falls in the key's area range, else nothing to average (NaN)."""
    areas = [a["area"] for a in gt_dict["annotations"] if not a["iscrowd"]]
    return {key: 0.0 if any(lo <= area <= hi for area in areas) else math.nan for key, (lo, hi) in _AREA_RANGES.items()}
