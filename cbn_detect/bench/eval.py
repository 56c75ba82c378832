"""`python -m cbn_detect.bench eval`: the vectorised VOC evaluator against a per-detection loop.

The issue asks for a VOC07-test-sized problem (4,952 images, 20 classes, 100 detections per image)
scored in at most 2 s on one CPU core. Neither implementation calls BLAS or torch, and numpy's
element-wise operations and sorts are single-threaded, so both run on one core without any thread
limit. The loop is timed in the same run so the ratio holds on whatever machine runs it; the two
mAPs must agree exactly, else the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from cbn_detect.evaluation.voc_ap import VOCResult, area_ap, evaluate_voc, voc07_ap
from cbn_detect.voc import VOC_CLASSES, Detections, GroundTruth, xyxy_to_voc

log = logging.getLogger(__name__)

IMAGE_SIZE = (500.0, 375.0)  # a typical VOC image (width, height)


def synthetic_problem(
    n_images: int, n_classes: int, dets_per_image: int, seed: int = 0
) -> tuple[GroundTruth, Detections]:
    """A seeded VOC-like split: about 3 objects per image (1 in 5 difficult, so ~2.4 positives),
    detections made of jittered copies of the objects (some with the wrong class) plus clutter.

    Boxes have integer VOC corners for the ground truth and float32-rounded coordinates and scores
    for the detections, as a detector run would produce.
    """
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    gt = GroundTruth([], [], [], [])
    dets = Detections([], [], [], [])
    for i in range(n_images):
        image_id = f"{i:06d}"
        n_obj = 1 + rng.poisson(2.0)
        wh = rng.uniform(20, 300, size=(n_obj, 2))
        x1 = np.floor(rng.uniform(0, width - wh[:, 0]))
        y1 = np.floor(rng.uniform(0, height - wh[:, 1]))
        gt_boxes = np.stack([x1, y1, np.floor(x1 + wh[:, 0]), np.floor(y1 + wh[:, 1])], axis=1)
        gt_labels = rng.integers(1, n_classes + 1, size=n_obj)
        gt.image_ids.append(image_id)
        gt.boxes.append(gt_boxes)
        gt.labels.append(gt_labels)
        gt.difficult.append(rng.random(n_obj) < 0.2)

        n_near = min(dets_per_image, 6 * n_obj)
        src = rng.integers(0, n_obj, size=n_near)
        size = np.tile(gt_boxes[src, 2:] - gt_boxes[src, :2], 2)  # (w, h, w, h)
        near = gt_boxes[src] + rng.normal(0, 0.12, size=(n_near, 4)) * size
        near_labels = np.where(rng.random(n_near) < 0.85, gt_labels[src], rng.integers(1, n_classes + 1, n_near))
        n_far = dets_per_image - n_near
        far_xy = rng.uniform(0, [width, height], size=(n_far, 2))
        far = np.concatenate([far_xy, far_xy + rng.uniform(10, 200, size=(n_far, 2))], axis=1)
        boxes = np.concatenate([near, far]).astype(np.float32).astype(np.float64)
        scores = np.concatenate([rng.beta(5, 2, n_near), rng.beta(2, 5, n_far)])
        dets.image_ids.append(image_id)
        dets.boxes.append(np.sort(boxes.reshape(-1, 2, 2), axis=1).reshape(-1, 4))
        dets.scores.append(scores.astype(np.float32).astype(np.float64))
        dets.labels.append(np.concatenate([near_labels, rng.integers(1, n_classes + 1, n_far)]))
    return gt, dets


def loop_evaluate_voc(
    gt: GroundTruth, dets: Detections, class_names: Sequence[str], metric: str = "voc07"
) -> VOCResult:
    """VOCevaldet.m transcribed loop for loop: the baseline the vectorised evaluator must beat."""
    ap: dict[str, float | None] = {}
    n_pos: dict[str, int] = {}
    for k, name in enumerate(class_names, start=1):
        gt_boxes, gt_diff, gt_taken = [], [], []
        npos = 0
        for boxes, labels, difficult in zip(gt.boxes, gt.labels, gt.difficult):
            mask = labels == k
            gt_boxes.append(xyxy_to_voc(boxes[mask]).tolist())
            gt_diff.append(difficult[mask].tolist())
            gt_taken.append([False] * int(mask.sum()))
            npos += int((~difficult[mask]).sum())
        found = []
        for i, (boxes, scores, labels) in enumerate(zip(dets.boxes, dets.scores, dets.labels)):
            mask = labels == k
            voc_boxes = xyxy_to_voc(boxes[mask]).tolist()
            found += [(s, i, b) for s, b in zip(scores[mask].tolist(), voc_boxes)]
        found.sort(key=lambda d: -d[0])  # Python's sort is stable: file order on ties
        n_pos[name] = npos
        if npos == 0:
            ap[name] = None
            continue
        tp, fp = [0.0] * len(found), [0.0] * len(found)
        for d, (_, i, bb) in enumerate(found):
            ovmax, jmax = -np.inf, -1
            for j, bbgt in enumerate(gt_boxes[i]):
                iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
                ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (
                        (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                        + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                        - iw * ih
                    )
                    ov = iw * ih / ua
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax >= 0.5:
                if not gt_diff[i][jmax]:
                    if not gt_taken[i][jmax]:
                        tp[d] = 1.0
                        gt_taken[i][jmax] = True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        with np.errstate(invalid="ignore"):
            prec = tp_cum / (tp_cum + fp_cum)
        rec = tp_cum / npos
        ap[name] = voc07_ap(rec, prec) if metric == "voc07" else area_ap(rec, prec)
    scored = [v for v in ap.values() if v is not None]
    return VOCResult(metric, float(np.mean(scored)) if scored else float("nan"), ap, n_pos)


def _best_time(fn: Callable[[], VOCResult], repeats: int) -> tuple[float, VOCResult]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cbn_detect.bench eval", description=__doc__)
    parser.add_argument("--images", type=int, default=4952)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--classes", type=int, default=len(VOC_CLASSES))
    parser.add_argument("--metric", choices=("voc07", "area"), default="voc07")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    """Build the problem, time both implementations, print the table; 1 if their mAPs differ."""
    args = parse_args(argv)
    class_names = [f"class{k}" for k in range(1, args.classes + 1)]
    gt, dets = synthetic_problem(args.images, args.classes, args.dets_per_image, args.seed)
    n_dets = sum(len(s) for s in dets.scores)
    log.info("%d images, %d classes, %d detections", args.images, args.classes, n_dets)

    t_vec, res_vec = _best_time(lambda: evaluate_voc(gt, dets, class_names, args.metric), args.repeats)
    t_loop, res_loop = _best_time(lambda: loop_evaluate_voc(gt, dets, class_names, args.metric), args.repeats)
    print(f"{'implementation':<16}{'seconds':>10}{'ratio':>10}")
    for name, seconds in (("vectorised", t_vec), ("loop", t_loop)):
        print(f"{name:<16}{seconds:>10.3f}{seconds / t_vec:>10.2f}")
    same = res_vec.ap == res_loop.ap
    print(
        f"mAP ({args.metric}): vectorised {res_vec.map:.6f}, loop {res_loop.map:.6f}, "
        f"{'identical' if same else 'DIFFERENT'}"
    )
    return 0 if same else 1
