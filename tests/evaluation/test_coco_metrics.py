"""COCO-style metrics through pycocotools on cases with known answers, and the fast backend's
agreement with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cbn_detect.bench.eval import synthetic_problem
from cbn_detect.evaluation.coco_metrics import COCO_KEYS, coco_ground_truth, evaluate_coco
from cbn_detect.voc import Detections, GroundTruth

CLASSES = ("cat", "dog")


def one_image(gt_rows, det_rows) -> tuple[GroundTruth, Detections]:
    """gt_rows: (label, difficult, x1, y1, x2, y2); det_rows: (label, score, x1, y1, x2, y2)."""
    g = np.array(gt_rows, dtype=float).reshape(-1, 6)
    d = np.array(det_rows, dtype=float).reshape(-1, 6)
    gt = GroundTruth(["a"], [g[:, 2:]], [g[:, 0].astype(np.int64)], [g[:, 1].astype(bool)])
    dets = Detections(["a"], [d[:, 2:]], [d[:, 1]], [d[:, 0].astype(np.int64)])
    return gt, dets


def check(result: dict[str, float], expected: dict[str, float]) -> None:
    assert list(result) == list(COCO_KEYS)
    for key in COCO_KEYS:
        if math.isnan(expected[key]):
            assert math.isnan(result[key]), key
        else:
            assert result[key] == pytest.approx(expected[key], abs=1e-9), key


NAN = math.nan


@pytest.mark.parametrize("reference", [True, False])
def test_perfect_medium_sized_detection(reference):
    gt, dets = one_image([(1, 0, 10, 10, 60, 60)], [(1, 0.9, 10, 10, 60, 60)])  # area 2500: medium
    expected = {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": NAN, "APm": 1.0, "APl": NAN}
    check(evaluate_coco(gt, dets, CLASSES, reference=reference), expected)


@pytest.mark.parametrize("reference", [True, False])
def test_iou_064_passes_three_of_ten_thresholds(reference):
    # IoU 6400 / 10000 = 0.64 >= 0.50, 0.55, 0.60 only: AP = 3/10, AP50 = 1, AP75 = 0.
    gt, dets = one_image([(1, 0, 0, 0, 100, 100)], [(1, 0.9, 0, 0, 100, 64)])
    expected = {"AP": 0.3, "AP50": 1.0, "AP75": 0.0, "APs": NAN, "APm": NAN, "APl": 0.3}
    check(evaluate_coco(gt, dets, CLASSES, reference=reference), expected)


@pytest.mark.parametrize("reference", [True, False])
def test_difficult_objects_are_ignore_regions(reference):
    gt_rows = [(1, 0, 0, 0, 20, 20), (1, 1, 50, 50, 70, 70)]
    # The higher-scored detection lies on the difficult object: ignored, not a false positive.
    det_rows = [(1, 0.9, 50, 50, 70, 70), (1, 0.5, 0, 0, 20, 20)]
    expected = {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": 1.0, "APm": NAN, "APl": NAN}
    gt, dets = one_image(gt_rows, det_rows)
    check(evaluate_coco(gt, dets, CLASSES, reference=reference), expected)
    assert [a["iscrowd"] for a in coco_ground_truth(gt, CLASSES)["annotations"]] == [0, 1]


@pytest.mark.parametrize("reference", [True, False])
def test_false_positive_ranked_first_halves_precision(reference):
    # 101-point interpolation: precision 1/2 at every recall level.
    gt, dets = one_image([(2, 0, 0, 0, 20, 20)], [(2, 0.9, 40, 40, 60, 60), (2, 0.5, 0, 0, 20, 20)])
    expected = {"AP": 0.5, "AP50": 0.5, "AP75": 0.5, "APs": 0.5, "APm": NAN, "APl": NAN}
    check(evaluate_coco(gt, dets, CLASSES, reference=reference), expected)


def test_no_detections_score_zero_where_objects_exist():
    gt, dets = one_image([(1, 0, 0, 0, 20, 20), (2, 1, 0, 0, 50, 50)], [])
    expected = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": NAN, "APl": NAN}
    check(evaluate_coco(gt, dets, CLASSES), expected)


def test_ground_truth_conversion_uses_xywh_and_box_area():
    gt, _ = one_image([(2, 0, 1.5, 2.0, 11.5, 7.0)], [])
    (ann,) = coco_ground_truth(gt, CLASSES)["annotations"]
    assert ann["bbox"] == [1.5, 2.0, 10.0, 5.0]
    assert ann["area"] == 50.0
    assert ann["category_id"] == 2


def test_libraries_print_nothing(capsys):
    gt, dets = one_image([(1, 0, 10, 10, 60, 60)], [(1, 0.9, 10, 10, 60, 60)])
    evaluate_coco(gt, dets, CLASSES, reference=True)
    evaluate_coco(gt, dets, CLASSES)
    assert capsys.readouterr().out == ""


def test_faster_coco_eval_agrees_with_pycocotools():
    pytest.importorskip("faster_coco_eval")
    gt, dets = synthetic_problem(n_images=80, n_classes=4, dets_per_image=30, seed=3)
    names = ["a", "b", "c", "d"]
    fast = evaluate_coco(gt, dets, names)
    reference = evaluate_coco(gt, dets, names, reference=True)
    assert not math.isnan(reference["AP"]) and 0 < reference["AP"] < 1
    for key in COCO_KEYS:
        if math.isnan(reference[key]):
            assert math.isnan(fast[key]), key
        else:
            # Same algorithm; only the order of floating-point summation differs.
            assert fast[key] == pytest.approx(reference[key], abs=1e-12), key
