"""PASCAL VOC detection AP, computed exactly as the official devkit does (VOCevaldet.m, VOCap.m).

Published VOC numbers are compared to the second decimal, so every rule of the devkit is mirrored,
including its arithmetic: overlaps are computed on the 1-based inclusive boxes the devkit would read
from our result files, with its "+1" widths in its order of operations, so that the IoU >= 0.5 test
falls the same way on boundary cases.

The devkit loops over detections one by one, but its matching needs no loop: each detection goes to
the ground-truth box it overlaps most, whether or not that box is already taken, so the best box is
independent of the other detections. Only "which detection takes a box first" depends on the score
order, and that is the first occurrence of the box in the sorted detections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cbn_detect.runtime.errors import ConfigError
from cbn_detect.voc import Detections, GroundTruth, xyxy_to_voc

METRICS: tuple[str, ...] = ("voc07", "area")
"""voc07: the 11-point interpolated AP of VOC 2007; area: the area under the precision envelope
(VOC 2010 and later)."""


def _matlab_zero_to_one_by_tenths() -> tuple[float, ...]:
    """The doubles of MATLAB's `0:0.1:1`, which VOCevaldet.m uses as its 11 recall thresholds.

    MATLAB builds a colon range symmetrically: a + k*d for the first half and b - k*d for the
    second. So its 4th value is 3*0.1 = 0.30000000000000004 but its 8th is 1 - 3*0.1 = 0.7 exactly,
    unlike np.arange (0.7000000000000001): a recall of exactly 7/10 counts at the 0.7 threshold in
    the devkit, and one of 3/10 does not count at 0.3.
    """
    n = 10
    values = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        values[k] = k * 0.1
        values[n - k] = 1.0 - k * 0.1
    values[n // 2] = (0.0 + 1.0) / 2
    return tuple(values)


_ELEVEN_THRESHOLDS = _matlab_zero_to_one_by_tenths()


@dataclass
class VOCResult:
    """Per-class AP and their mean; AP None marks a class without positives (not in the mean)."""

    metric: str
    map: float
    ap: dict[str, float | None]
    n_pos: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        """The JSON form {"metric", "mAP", "ap"}; a NaN mAP (no class with positives) becomes None
        because strict JSON has no NaN."""
        return {
            "metric": self.metric,
            "mAP": None if math.isnan(self.map) else self.map,
            "ap": dict(self.ap),
        }


def evaluate_voc(
    gt: GroundTruth,
    dets: Detections,
    class_names: Sequence[str],
    metric: str = "voc07",
    iou_threshold: float = 0.5,
) -> VOCResult:
    """Score detections against ground truth as the devkit scores the equivalent comp4 files."""
    if metric not in METRICS:
        raise ConfigError(f"unknown VOC metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if list(dets.image_ids) != list(gt.image_ids):
        raise ValueError("detections and ground truth must list the same images in the same order")
    n_classes = len(class_names)

    gt_img, gt_boxes, gt_labels, gt_difficult = _flatten_gt(gt)
    det_img, det_boxes, det_scores, det_labels = _flatten_dets(dets)
    for name, labels in (("ground-truth", gt_labels), ("detection", det_labels)):
        if labels.size and (labels.min() < 1 or labels.max() > n_classes):
            raise ValueError(f"{name} labels must lie in 1..{n_classes}")

    # Group keys: one group per (image, class); the devkit only compares boxes within a group.
    gt_keys = gt_img * n_classes + (gt_labels - 1)
    det_keys = det_img * n_classes + (det_labels - 1)
    ovmax, jmax = _best_overlaps(xyxy_to_voc(det_boxes), det_keys, xyxy_to_voc(gt_boxes), gt_keys)

    # Class by class, detections by descending score; stable sorts keep file order on ties.
    order = np.argsort(-det_scores, kind="stable")
    order = order[np.argsort(det_labels[order], kind="stable")]
    tp, fp = _assign(ovmax[order], jmax[order], gt_difficult, iou_threshold)
    bounds = np.searchsorted(det_labels[order], np.arange(1, n_classes + 2))

    n_pos_all = np.bincount(gt_labels[~gt_difficult], minlength=n_classes + 1)
    ap: dict[str, float | None] = {}
    n_pos: dict[str, int] = {}
    for k, name in enumerate(class_names):
        npos = int(n_pos_all[k + 1])
        n_pos[name] = npos
        if npos == 0:
            ap[name] = None
            continue
        lo, hi = bounds[k], bounds[k + 1]
        tp_cum = np.cumsum(tp[lo:hi])
        fp_cum = np.cumsum(fp[lo:hi])
        rec = tp_cum / npos
        with np.errstate(invalid="ignore"):
            prec = tp_cum / (fp_cum + tp_cum)  # 0/0 = NaN while only difficult boxes were hit
        ap[name] = voc07_ap(rec, prec) if metric == "voc07" else area_ap(rec, prec)

    scored = [v for v in ap.values() if v is not None]
    mean = float(np.mean(scored)) if scored else math.nan
    return VOCResult(metric=metric, map=mean, ap=ap, n_pos=n_pos)


def voc07_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """11-point interpolated AP of VOCevaldet.m (VOC 2007): mean over t in 0:0.1:1 of the highest
    precision at recall >= t.

    NaN precisions (no detection counted yet) are skipped, as MATLAB's max skips them. One
    deliberate deviation: where every candidate is NaN the devkit's AP is NaN, which would poison
    the mean; here that point contributes 0, as for an empty set.
    """
    # rec never decreases, so {rec >= t} is a suffix and its max is a suffix maximum.
    suffix_max = np.fmax.accumulate(prec[::-1])[::-1]
    first = np.searchsorted(rec, _ELEVEN_THRESHOLDS, side="left")
    points = [float(suffix_max[i]) if i < rec.size else 0.0 for i in first]
    # The devkit accumulates ap + p/11, which makes a perfect AP 1.0000000000000002; an exact sum
    # divided once keeps AP within [0, 1] and differs from it by at most a few ulps.
    return math.fsum(0.0 if math.isnan(p) else p for p in points) / 11


def area_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOCap.m (VOC 2010+): area under the monotone envelope of the precision/recall curve."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.fmax.accumulate(mpre[::-1])[::-1]  # fmax skips NaN like MATLAB's max
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def _flatten_gt(gt: GroundTruth) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    counts = np.array([len(labels) for labels in gt.labels], dtype=np.int64)
    img = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    boxes = _concat(gt.boxes, (0, 4), np.float64)
    labels = _concat(gt.labels, (0,), np.int64)
    difficult = _concat(gt.difficult, (0,), bool)
    return img, boxes, labels, difficult


def _flatten_dets(dets: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    counts = np.array([len(scores) for scores in dets.scores], dtype=np.int64)
    img = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    boxes = _concat(dets.boxes, (0, 4), np.float64)
    scores = _concat(dets.scores, (0,), np.float64)
    labels = _concat(dets.labels, (0,), np.int64)
    return img, boxes, scores, labels


def _concat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    parts = [np.asarray(a, dtype=dtype).reshape((-1,) + empty_shape[1:]) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


def _best_overlaps(
    det_voc: np.ndarray, det_keys: np.ndarray, gt_voc: np.ndarray, gt_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For every detection, the devkit's ovmax and jmax over the ground truth of its group.

    Boxes are in the devkit's 1-based inclusive convention. jmax is a flat ground-truth index (-1
    where no box intersects; ovmax is then -inf, as in the devkit). Ties go to the first box in
    annotation order, as MATLAB's strict `ov > ovmax` does.
    """
    gt_order = np.argsort(gt_keys, kind="stable")  # stable: annotation order within a group
    sorted_keys = gt_keys[gt_order]
    start = np.searchsorted(sorted_keys, det_keys, side="left")
    count = np.searchsorted(sorted_keys, det_keys, side="right") - start

    # Every (detection, ground truth) pair of the same group, detection-major.
    n_pairs = int(count.sum())
    pair_det = np.repeat(np.arange(len(det_keys)), count)
    pair_offset = np.cumsum(count) - count
    pair_gt = gt_order[start[pair_det] + np.arange(n_pairs) - pair_offset[pair_det]]
    ov = _devkit_overlap(det_voc[pair_det], gt_voc[pair_gt])

    ovmax = np.full(len(det_keys), -np.inf)
    jmax = np.full(len(det_keys), -1, dtype=np.int64)
    has_gt = count > 0
    if n_pairs:
        seg_start = pair_offset[has_gt]
        best = np.maximum.reduceat(ov, seg_start)
        is_best = ov == np.repeat(best, count[has_gt])
        first_best = np.minimum.reduceat(np.where(is_best, np.arange(n_pairs), n_pairs), seg_start)
        found = best > -np.inf
        ovmax[has_gt] = best
        jmax[np.flatnonzero(has_gt)[found]] = pair_gt[first_best[found]]
    return ovmax, jmax


def _devkit_overlap(bb: np.ndarray, bbgt: np.ndarray) -> np.ndarray:
    """VOCevaldet.m's overlap of paired boxes, operation for operation; -inf where the devkit skips
    the pair (no positive intersection width and height)."""
    iw = np.minimum(bb[:, 2], bbgt[:, 2]) - np.maximum(bb[:, 0], bbgt[:, 0]) + 1
    ih = np.minimum(bb[:, 3], bbgt[:, 3]) - np.maximum(bb[:, 1], bbgt[:, 1]) + 1
    ua = (
        (bb[:, 2] - bb[:, 0] + 1) * (bb[:, 3] - bb[:, 1] + 1)
        + (bbgt[:, 2] - bbgt[:, 0] + 1) * (bbgt[:, 3] - bbgt[:, 1] + 1)
        - iw * ih
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = iw * ih / ua
    return np.where((iw > 0) & (ih > 0), ov, -np.inf)


def _assign(
    ovmax: np.ndarray, jmax: np.ndarray, gt_difficult: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive flags (float64, 0 or 1) of detections in sorted order.

    A hit on a difficult box is neither; a hit on a non-difficult box is a true positive for the
    first detection to reach that box and a false positive (duplicate) for every later one.
    """
    hit = ovmax >= iou_threshold
    on_difficult = np.zeros_like(hit)
    on_difficult[hit] = gt_difficult[jmax[hit]]
    candidate = np.flatnonzero(hit & ~on_difficult)
    _, first = np.unique(jmax[candidate], return_index=True)
    tp = np.zeros(len(ovmax))
    tp[candidate[first]] = 1.0
    fp = (~on_difficult).astype(np.float64) - tp
    return tp, fp
