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

from cbn_detect.evaluation import voc_ap
from cbn_detect.evaluation.voc_ap import area_ap, evaluate_voc, voc07_ap
from cbn_detect.voc import Detections, GroundTruth, voc_to_xyxy
from tests.helpers.voc_reference import reference_ap

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


# MATLAB's 0:0.1:1 (the colon operator builds a + k*d up to the middle, b - k*d after it), as
# doubles written out: 3*0.1 is 0.30000000000000004 but 1 - 3*0.1 is 0.7 exactly.
MATLAB_TENTHS = (0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_the_eleven_recall_thresholds_are_matlabs_doubles() -> None:
    got = voc_ap._matlab_zero_to_one_by_tenths()
    assert len(got) == 11 and all(a == b for a, b in zip(got, MATLAB_TENTHS)), got
    assert voc_ap._ELEVEN_THRESHOLDS == MATLAB_TENTHS


def test_an_overlap_tie_goes_to_the_first_box_in_annotation_order_among_many() -> None:
    """Worked by hand. One image, boxes of two classes interleaved (cat at annotation positions
    1, 3, 5, 7, 9); cat boxes 5 (difficult) and 7 (not) are the same box B. The devkit's strict
    ``ov > ovmax`` gives a detection on B to box 5, so it is ignored, and the second detection,
    on cat box 3, is the only true positive: recall 1/4 (4 non-difficult cats), precision 1,
    VOC07 AP = 3/11 (thresholds 0, 0.1, 0.2). Given to box 7 instead (a sort that forgets the
    annotation order), both would count: AP 6/11."""

    b = (50, 50, 80, 80)
    objects = []
    for k in range(10):
        if k % 2 == 0:
            objects.append((2, (1 + 5 * k, 1, 4 + 5 * k, 4), False))  # dogs, out of the way
        else:
            box = b if k in (5, 7) else (100 + 10 * k, 100, 105 + 10 * k, 105)
            objects.append((1, box, k == 5))
    dets = [(1, 0.9, b), (1, 0.8, (130, 100, 135, 105))]  # on B, then on cat box 3
    result = ap_of([objects], [dets])
    assert result.n_pos == {"cat": 4, "dog": 5}
    assert result.ap["cat"] == pytest.approx(3 / 11, abs=1e-15)


def test_best_overlaps_marks_detections_without_any_overlap() -> None:
    """The documented result of the matching helper, by hand (devkit +1 boxes): per detection the
    largest IoU with a box of its group and that box's flat index; -inf and -1 where no box of
    its group intersects it (another group's box does not count)."""
    gt = np.array([[1.0, 1.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [21.0, 21.0, 30.0, 30.0]])
    gt_keys = np.array([0, 1, 0])
    det = np.array(
        [
            [1.0, 1.0, 10.0, 5.0],
            [40.0, 40.0, 50.0, 50.0],
            [1.0, 1.0, 10.0, 10.0],
            [1.0, 1.0, 5.0, 5.0],
            [1.0, 40.0, 10.0, 50.0],  # overlaps box 0 in x only: iw = 10, ih = -29
            [11.0, 1.0, 20.0, 10.0],  # touches box 0 on the right: iw = 0 (+1 convention), ih = 10
            [1.0, 11.0, 10.0, 20.0],
        ]
    )  # touches it below: ih = 0
    det_keys = np.array([0, 0, 2, 1, 0, 0, 0])
    ovmax, jmax = voc_ap._best_overlaps(det, det_keys, gt, gt_keys)
    assert ovmax.tolist() == [50 / 100, -np.inf, -np.inf, 25 / 100, -np.inf, -np.inf, -np.inf]
    assert jmax.tolist() == [0, -1, -1, 1, -1, -1, -1] and jmax.dtype == np.int64


def test_iou_uses_the_devkits_plus_one_widths_near_the_threshold() -> None:
    """By hand, in VOC pixels: ground truth (1, 1, 10, 10) is 10 x 10 = 100 pixels. A detection
    (1, 1, 9, 5) covers 9 x 5 = 45 of them: IoU 45 / 100 = 0.45, a false positive (one pixel more
    on each side of the intersection would make it 50 / 95 > 0.5). The next one, (1, 1, 10, 5),
    has IoU 50 / 100 = 0.5 exactly: a true positive. Recall [0, 1], precision [0, 1/2]: VOC07
    AP 1/2 (the best precision at recall >= t is 1/2 for every t)."""

    result = ap_of([[(1, (1, 1, 10, 10), False)]], [[(1, 0.9, (1, 1, 9, 5)), (1, 0.8, (1, 1, 10, 5))]])
    assert result.ap["cat"] == 0.5


def test_no_images_give_no_ap_and_a_nan_map() -> None:
    from cbn_detect.voc import Detections, GroundTruth

    result = voc_ap.evaluate_voc(GroundTruth([], [], [], []), Detections([], [], [], []), ["cat", "dog"])
    assert math.isnan(result.map) and result.ap == {"cat": None, "dog": None} and result.n_pos == {"cat": 0, "dog": 0}
    assert result.to_dict() == {"metric": "voc07", "mAP": None, "ap": {"cat": None, "dog": None}}


def test_evaluation_errors_say_what_is_wrong() -> None:
    from cbn_detect.runtime.errors import ConfigError

    gt = make_gt([[(1, (1, 1, 10, 10), False)], [(3, (1, 1, 10, 10), False)]])
    dets = make_dets([[(1, 0.9, (1, 1, 10, 10))], []])
    with pytest.raises(ConfigError, match=r"^unknown VOC metric 'coco'; valid metrics: voc07, area$"):
        voc_ap.evaluate_voc(gt, dets, ["cat", "dog"], metric="coco")
    with pytest.raises(ValueError, match=r"^detections and ground truth must list the same images in the same order$"):
        voc_ap.evaluate_voc(gt, make_dets([[]]), ["cat", "dog"])
    with pytest.raises(ValueError, match=r"^ground-truth labels must lie in 1\.\.2$"):
        voc_ap.evaluate_voc(gt, dets, ["cat", "dog"])
    with pytest.raises(ValueError, match=r"^detection labels must lie in 1\.\.3$"):
        voc_ap.evaluate_voc(gt, make_dets([[(4, 0.9, (1, 1, 10, 10))], []]), ["cat", "dog", "bird"])
