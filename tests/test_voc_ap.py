"""VOC AP against hand-worked cases of every devkit rule, and against a plain loop (hypothesis).

Boxes in these tests are written in the devkit's 1-based inclusive convention, as in the XML and
result files, and converted with cbn_detect.voc.boxes, as the real pipeline does.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbn_detect.evaluation.voc_ap import area_ap, evaluate_voc, voc07_ap
from cbn_detect.voc import Detections, GroundTruth, voc_to_xyxy

CLASSES = ("cat", "dog")


def make_gt(images: list[list[tuple]]) -> GroundTruth:
    """images: per image a list of (label, (xmin, ymin, xmax, ymax) VOC, difficult)."""
    return GroundTruth(
        image_ids=[f"im{i}" for i in range(len(images))],
        boxes=[voc_to_xyxy(np.array([o[1] for o in objs], dtype=float)) for objs in images],
        labels=[np.array([o[0] for o in objs], dtype=np.int64) for objs in images],
        difficult=[np.array([o[2] for o in objs], dtype=bool) for objs in images],
    )


def make_dets(images: list[list[tuple]]) -> Detections:
    """images: per image a list of (label, score, (xmin, ymin, xmax, ymax) VOC)."""
    return Detections(
        image_ids=[f"im{i}" for i in range(len(images))],
        boxes=[voc_to_xyxy(np.array([d[2] for d in dets], dtype=float)) for dets in images],
        scores=[np.array([d[1] for d in dets], dtype=float) for dets in images],
        labels=[np.array([d[0] for d in dets], dtype=np.int64) for dets in images],
    )


def ap_of(gt_images, det_images, metric="voc07", classes=CLASSES):
    return evaluate_voc(make_gt(gt_images), make_dets(det_images), classes, metric=metric)


BOX = (1, 1, 10, 10)  # 10 x 10 pixels in the devkit's +1 convention
FAR = (50, 50, 60, 60)  # overlaps nothing


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_perfect_detections_score_one(metric):
    gt, dets = [[(1, BOX, False)], [(2, FAR, False)]], [[(1, 0.9, BOX)], [(2, 0.8, FAR)]]
    result = ap_of(gt, dets, metric)
    assert result.ap == {"cat": 1.0, "dog": 1.0}
    assert result.map == 1.0
    assert result.metric == metric


def test_plus_one_convention_decides_the_half_overlap():
    # Devkit: det 10x5 = 50 px inside a 10x10 = 100 px box: IoU exactly 0.5 >= 0.5, a hit.
    # Without the +1 (9x4 inside 9x9) it would be 36/81 < 0.5, a miss.
    result = ap_of([[(1, BOX, False)]], [[(1, 0.9, (1, 1, 10, 5))]])
    assert result.ap["cat"] == 1.0
    # One pixel less is below 0.5 whatever the convention.
    assert ap_of([[(1, BOX, False)]], [[(1, 0.9, (1, 1, 10, 4))]]).ap["cat"] == 0.0


def test_single_pixel_intersection_counts_as_overlap():
    # iw = ih = 1 > 0 in the devkit: a 1x1 box on the corner pixel of a 1x1 ground truth is IoU 1.
    result = ap_of([[(1, (5, 5, 5, 5), False)]], [[(1, 0.9, (5, 5, 5, 5))]])
    assert result.ap["cat"] == 1.0


def test_score_ties_keep_file_order_within_an_image():
    miss, hit = (1, 0.5, FAR), (1, 0.5, BOX)
    # Miss listed first: precision 0 then 1/2 at recall 1 -> every 11-point sample is 1/2.
    assert ap_of([[(1, BOX, False)]], [[miss, hit]]).ap["cat"] == pytest.approx(0.5, abs=1e-15)
    assert ap_of([[(1, BOX, False)]], [[hit, miss]]).ap["cat"] == 1.0


def test_score_ties_keep_split_order_across_images():
    gt = [[(1, BOX, False)], []]
    assert ap_of(gt, [[(1, 0.5, BOX)], [(1, 0.5, FAR)]]).ap["cat"] == 1.0
    gt_second = [[], [(1, BOX, False)]]
    result = ap_of(gt_second, [[(1, 0.5, FAR)], [(1, 0.5, BOX)]])
    assert result.ap["cat"] == pytest.approx(0.5, abs=1e-15)


def test_duplicate_detection_is_a_false_positive():
    other = (30, 30, 39, 39)
    gt = [[(1, BOX, False), (1, other, False)]]
    dets = [[(1, 0.9, BOX), (1, 0.8, BOX), (1, 0.7, other)]]
    # tp = 1 0 1, fp = 0 1 0: recall 1/2 1/2 1, precision 1 1/2 2/3.
    # 11-point: t <= 0.5 (6 points) -> 1; t >= 0.6 (5 points) -> 2/3.
    assert ap_of(gt, dets).ap["cat"] == pytest.approx(float(Fraction(6 + 5 * Fraction(2, 3), 11)))
    # Area: recall steps 1/2 at precision 1, then 1/2 at 2/3.
    assert ap_of(gt, dets, "area").ap["cat"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_detection_taken_box_does_not_fall_back_to_second_best():
    # Two overlapping objects; the second detection overlaps the first object most (already
    # taken) and the second object with IoU >= 0.5 too: the devkit still counts it as a duplicate.
    a, b = (1, 1, 10, 10), (1, 1, 10, 12)
    gt = [[(1, a, False), (1, b, False)]]
    dets = [[(1, 0.9, a), (1, 0.8, a)]]
    # tp = 1 0: recall 1/2 1/2, precision 1 1/2 -> 6 of 11 points at precision 1.
    assert ap_of(gt, dets).ap["cat"] == pytest.approx(6 / 11)


def test_hit_on_difficult_object_is_ignored():
    hard = (30, 30, 39, 39)
    gt = [[(1, BOX, False), (1, hard, True)]]
    # The ignored detection ranks first: it must not count as a false positive.
    result = ap_of(gt, [[(1, 0.9, hard), (1, 0.9, hard), (1, 0.8, BOX)]])
    assert result.ap["cat"] == 1.0
    assert result.n_pos["cat"] == 1


def test_best_overlap_on_difficult_object_is_ignored_even_if_a_positive_overlaps():
    hard, easy = (1, 1, 10, 10), (1, 1, 10, 14)
    # IoU 1.0 with the difficult object, 100/140 >= 0.5 with the positive: ignored, not a hit.
    result = ap_of([[(1, hard, True), (1, easy, False)]], [[(1, 0.9, hard)]])
    assert result.ap["cat"] == 0.0


@pytest.mark.parametrize(("first_difficult", "expected"), [(True, 0.0), (False, 1.0)])
def test_equal_overlaps_go_to_the_first_object_in_annotation_order(first_difficult, expected):
    gt = [[(1, BOX, first_difficult), (1, BOX, not first_difficult)]]
    assert ap_of(gt, [[(1, 0.9, BOX)]]).ap["cat"] == expected


def test_overlap_below_threshold_is_a_false_positive_and_threshold_is_configurable():
    gt, dets = [[(1, BOX, False)]], [[(1, 0.9, (1, 1, 10, 4))]]  # IoU 0.4
    assert ap_of(gt, dets).ap["cat"] == 0.0
    relaxed = evaluate_voc(make_gt(gt), make_dets(dets), CLASSES, iou_threshold=0.4)
    assert relaxed.ap["cat"] == 1.0


def test_detections_of_another_class_never_match():
    result = ap_of([[(1, BOX, False)]], [[(2, 0.9, BOX)]])
    assert result.ap["cat"] == 0.0
    assert result.ap["dog"] is None


def test_class_without_positives_is_left_out_of_the_mean():
    gt = [[(1, BOX, False), (2, FAR, True)]]  # dog: only a difficult object
    result = ap_of(gt, [[(1, 0.9, BOX), (2, 0.9, FAR)]])
    assert result.ap == {"cat": 1.0, "dog": None}
    assert result.n_pos == {"cat": 1, "dog": 0}
    assert result.map == 1.0
    assert result.to_dict() == {"metric": "voc07", "mAP": 1.0, "ap": {"cat": 1.0, "dog": None}}


def test_class_with_positives_and_no_detections_scores_zero():
    result = ap_of([[(1, BOX, False), (2, FAR, False)]], [[(1, 0.9, BOX)]])
    assert result.ap == {"cat": 1.0, "dog": 0.0}
    assert result.map == 0.5


def test_no_class_with_positives_gives_nan_map_and_null_in_json():
    result = ap_of([[]], [[(1, 0.9, BOX)]])
    assert math.isnan(result.map)
    assert result.to_dict()["mAP"] is None


def test_eleven_point_thresholds_are_matlabs_colon_values():
    # MATLAB's 0:0.1:1 holds 0.7 exactly (np.arange gives 0.7000000000000001) but
    # 0.30000000000000004 (not 0.3). With 10 positives, recall 7/10 reaches the 0.7 point ...
    rec, prec = np.arange(1, 8) / 10, np.ones(7)
    assert voc07_ap(rec, prec) == pytest.approx(8 / 11)
    # ... and recall 3/10 = 0.3 misses the 0.30000000000000004 point.
    rec, prec = np.arange(1, 4) / 10, np.ones(3)
    assert voc07_ap(rec, prec) == pytest.approx(3 / 11)


def test_eleven_point_edge_case_end_to_end():
    gt = [[(1, (10 * i + 1, 1, 10 * i + 5, 5), False) for i in range(10)]]
    dets = [[(1, 1.0 - i / 100, (10 * i + 1, 1, 10 * i + 5, 5)) for i in range(7)]]
    assert ap_of(gt, dets).ap["cat"] == pytest.approx(8 / 11)


def test_area_ap_fills_precision_envelope_and_skips_undefined_precision():
    rec = np.array([0.0, 0.5, 0.5, 1.0])
    prec = np.array([np.nan, 0.5, 1 / 3, 0.5])
    # Envelope: 0.5 over (0, 0.5], 0.5 over (0.5, 1].
    assert area_ap(rec, prec) == pytest.approx(0.5)
    assert voc07_ap(rec, prec) == pytest.approx(0.5)
    # Only undefined precision (every hit on a difficult object): 0, not NaN.
    assert voc07_ap(np.zeros(2), np.full(2, np.nan)) == 0.0


def test_rejects_inconsistent_inputs():
    gt, dets = make_gt([[(1, BOX, False)]]), make_dets([[(1, 0.9, BOX)]])
    with pytest.raises(ValueError, match="unknown VOC metric"):
        evaluate_voc(gt, dets, CLASSES, metric="coco")
    with pytest.raises(ValueError, match="1..1"):
        evaluate_voc(gt, make_dets([[(2, 0.9, BOX)]]), ("cat",))
    dets.image_ids = ["other"]
    with pytest.raises(ValueError, match="same images"):
        evaluate_voc(gt, dets, CLASSES)


# --- property test: the vectorised evaluator equals a plain transcription of VOCevaldet.m ---

MATLAB_TENTHS = [0.0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 1 - 4 * 0.1, 1 - 3 * 0.1, 0.8, 0.9, 1.0]


def reference_ap(gt_images, det_images, n_classes, metric, threshold=0.5):
    """VOCevaldet.m + VOCap.m line by line, on VOC-convention tuples."""
    aps = {}
    for c in range(1, n_classes + 1):
        gts = [[(box, diff) for lab, box, diff in objs if lab == c] for objs in gt_images]
        taken = [[False] * len(g) for g in gts]
        npos = sum(not diff for g in gts for _, diff in g)
        found = [(s, i, box) for i, ds in enumerate(det_images) for lab, s, box in ds if lab == c]
        found.sort(key=lambda d: -d[0])
        tp, fp = [], []
        for _, i, bb in found:
            ovmax, jmax = -math.inf, None
            for j, (g, _) in enumerate(gts[i]):
                iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
                ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (
                        g[3] - g[1] + 1
                    ) - iw * ih
                    if iw * ih / ua > ovmax:
                        ovmax, jmax = iw * ih / ua, j
            is_tp = is_fp = 0
            if ovmax >= threshold:
                if not gts[i][jmax][1]:
                    if taken[i][jmax]:
                        is_fp = 1
                    else:
                        is_tp, taken[i][jmax] = 1, True
            else:
                is_fp = 1
            tp.append((tp[-1] if tp else 0) + is_tp)
            fp.append((fp[-1] if fp else 0) + is_fp)
        if npos == 0:
            aps[c] = None
            continue
        rec = [t / npos for t in tp]
        prec = [t / (t + f) if t + f else math.nan for t, f in zip(tp, fp)]
        if metric == "voc07":
            ap = 0.0
            for t in MATLAB_TENTHS:
                ps = [p for r, p in zip(rec, prec) if r >= t and not math.isnan(p)]
                ap += (max(ps) if ps else 0.0) / 11
        else:
            mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
            for k in range(len(mpre) - 2, -1, -1):
                mpre[k] = mpre[k + 1] if math.isnan(mpre[k]) else max(mpre[k], mpre[k + 1])
            steps = [k for k in range(1, len(mrec)) if mrec[k] != mrec[k - 1]]
            ap = sum((mrec[k] - mrec[k - 1]) * mpre[k] for k in steps)
        aps[c] = ap
    return aps


coord = st.integers(1, 12).map(float) | st.integers(2, 24).map(lambda v: v / 2)


@st.composite
def voc_box(draw):
    x1, y1 = draw(coord), draw(coord)
    return (x1, y1, x1 + draw(st.integers(0, 6)), y1 + draw(st.integers(0, 6)))


# Boxes often repeat, so that overlaps tie between objects (and their difficult flags).
box = voc_box() | st.sampled_from([(1.0, 1.0, 5.0, 5.0), (2.0, 1.0, 6.0, 5.0)])


@st.composite
def problem(draw):
    n_images = draw(st.integers(1, 4))
    label = st.integers(1, 2)
    gt = [draw(st.lists(st.tuples(label, box, st.booleans()), max_size=4)) for _ in range(n_images)]
    score = st.sampled_from([0.2, 0.5, 0.5, 0.9])  # score ties are common on purpose too
    dets = [draw(st.lists(st.tuples(label, score, box), max_size=6)) for _ in range(n_images)]
    return gt, dets


@settings(max_examples=150, deadline=None)
@given(problem(), st.sampled_from(["voc07", "area"]))
def test_vectorised_equals_plain_loop(case, metric):
    gt_images, det_images = case
    expected = reference_ap(gt_images, det_images, 2, metric)
    result = ap_of(gt_images, det_images, metric)
    for c, name in enumerate(CLASSES, start=1):
        if expected[c] is None:
            assert result.ap[name] is None
        else:
            assert result.ap[name] == pytest.approx(expected[c], rel=1e-12, abs=1e-12)
