"""Tests that kill `make mutate`'s surviving mutants of the numerical core's plain-Python parts:
loss variance, results.json, the report's statistics, VOC AP, devkit files, VOC boxes and
annotations. Every expected value is known another way: a closed form, a hand computation, numpy
on the same numbers, or a plain loop written here - never the code under test."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from cbn_detect.engine.loss_stats import loss_variance
from cbn_detect.results import Results, completed_results, read_results, results_text, write_results

# --- loss variance -------------------------------------------------------------------------------


def test_loss_variance_is_the_population_variance_by_hand() -> None:
    # mean 1.5, squared deviations 0.25 + 2.25 + 0.25 + 2.25 = 5: 5 / 4 (the sample variance is 5 / 3)
    assert loss_variance([1.0, 3.0, 2.0, 0.0]) == 1.25
    assert loss_variance([5.0, 7.0]) == 1.0  # population: ((-1)^2 + 1^2) / 2; the sample one is 2
    assert loss_variance((2.5, 2.5, 2.5)) == 0.0  # a flat loss has variance 0, not NaN


def test_loss_variance_of_float32_losses_is_computed_in_float64() -> None:
    # float32 losses (a loss tensor's .item()s gathered in an array) are not summed in float32:
    # statistics.pvariance is exact (rational arithmetic) on the same float32 values.
    losses = np.float32([10000.1, 10000.2, 10000.35, 9999.9])
    exact = statistics.pvariance([float(v) for v in losses])
    assert loss_variance(losses) == pytest.approx(exact, rel=1e-12)
    assert abs(float(losses.var()) - exact) > 1e-8  # float32 arithmetic would be off by 2e-6 relative


@pytest.mark.parametrize("losses", [[], [0.7], [1.0, math.nan], [1.0, math.inf, 2.0], [-math.inf, 1.0]])
def test_loss_variance_is_nan_for_fewer_than_two_finite_losses(losses: list[float]) -> None:
    assert math.isnan(loss_variance(losses))


# --- results.json --------------------------------------------------------------------------------

IDENTITY = dict(model="retinanet_tiny", norm="cbn", batch=4, world_size=2, total_batch=8, seed=3, data="synthetic")


def full_results(**changes) -> Results:
    fields = dict(
        status="completed", **IDENTITY,
        map_voc07=0.123456, map_area=0.5, ap_per_class={"cat": 0.25, "dog": None}, ap_metric="area",
        coco={"AP": 0.1, "AP50": 0.25}, fps={"fps_model": 12.345, "fps_end_to_end": 9.87, "device": "cpu", "dtype": "float32"},
        loss_variance=0.03125, final_loss=1.5, train_time_s=100.0, epochs=2, steps=8,
    )
    return Results(**{**fields, **changes})


def test_results_text_is_the_original_studys_file_line_by_line() -> None:
    assert results_text(full_results()) == (
        "model: retinanet_tiny\n"
        "norm: cbn\n"
        "batch per process: 4  world size: 2  total batch: 8\n"
        "seed: 3\n"
        "status: completed\n"
        "map_voc07: 0.1235\n"
        "map_area: 0.5000\n"
        "loss_variance: 0.0312\n"
        "final_loss: 1.5000\n"
        "train_time_s: 100.0000\n"
        "epochs: 2\n"
        "steps: 8\n"
        "coco: AP 0.1000  AP50 0.2500\n"
        "fps (batch 1, cpu, float32): model 12.3  end-to-end 9.9\n"
        "AP per class (area):\n"
        "  cat            0.2500\n"
        "  dog            no positives\n"
    )


def test_results_text_of_a_failed_run_names_the_error_and_defaults_the_ap_metric() -> None:
    failed = Results(status="failed", **IDENTITY, error="boom", ap_per_class={"cat": 0.5})
    assert results_text(failed).splitlines()[4:] == ["status: failed", "error: boom", "AP per class (voc07):",
                                                      "  cat            0.5000"]
    skipped = Results(status="skipped", **IDENTITY, reason="batch 1", map_voc07=None)
    assert results_text(skipped).splitlines()[4:] == ["status: skipped", "reason: batch 1"]


def test_results_round_trip_keeps_unknown_keys_and_leaves_out_what_does_not_apply(tmp_path: Path) -> None:
    results = full_results()
    on_disk = results.to_dict()
    assert "extra" not in on_disk and "error" not in on_disk and "reason" not in on_disk
    assert on_disk["schema_version"] == 1 and on_disk["ap_per_class"] == {"cat": 0.25, "dog": None}
    newer = {**on_disk, "extra": [1], "added_later": {"x": 2}}  # a newer writer's keys, one named "extra"
    read = Results.from_dict(newer)
    assert read.extra == {"extra": [1], "added_later": {"x": 2}}
    assert read.map_voc07 == 0.123456 and read.to_dict() == newer


def test_results_written_before_the_schema_had_a_version_read_as_version_0(tmp_path: Path) -> None:
    old = Results.from_dict({"status": "completed", "map_voc07": 0.5})
    assert old.schema_version == 0 and old.model is None and old.extra == {}
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "model": "ssd300"}))
    assert read_results(tmp_path).schema_version == 0


def test_only_a_completed_run_counts_as_completed(tmp_path: Path) -> None:
    assert completed_results(tmp_path) is None  # no file yet
    for status in ("failed", "diverged", "interrupted", "skipped", "COMPLETED"):
        write_results(tmp_path, full_results(status=status))
        assert completed_results(tmp_path) is None, status
    write_results(tmp_path, full_results())
    found = completed_results(tmp_path)
    assert found is not None and found.status == "completed" and found.map_voc07 == 0.123456
    assert (tmp_path / "results_batch_4.txt").read_text() == results_text(found)


def test_an_unreadable_results_json_is_named_with_its_error_type(tmp_path: Path, caplog) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"status": ')
    caplog.set_level(logging.WARNING, logger="cbn_detect.results")
    assert completed_results(tmp_path) is None
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"{path} cannot be read (JSONDecodeError: ")
    assert message.endswith("; counting the job as not completed")
    caplog.clear()
    assert completed_results(tmp_path, warn=False) is None and not caplog.records
    path.write_bytes('{"status": "completed", "model": "r\u00e9tina"}'.encode("utf-8"))
    assert read_results(tmp_path).model == "r\u00e9tina"


# --- the report's statistics (stats.py) ----------------------------------------------------------

from cbn_detect import stats  # noqa: E402


def test_an_estimate_carries_its_confidence_whatever_its_size() -> None:
    for values in ([], [0.5], [0.5, 0.7]):
        assert stats.estimate(values).confidence == 0.95
        assert stats.estimate(values, confidence=0.9).confidence == 0.9


def test_paired_differences_go_on_past_a_seed_the_baseline_lacks() -> None:
    assert stats.paired_differences({7: 0.5, 1: 0.75, 2: 0.25}, {1: 0.5, 2: 0.5}) == {1: 0.25, 2: -0.25}


def test_t_cdf_matches_the_cauchy_closed_form_on_both_sides() -> None:
    # df = 1: P(T <= t) = 1/2 + atan(t) / pi
    for t in (-3.0, -1.0, -0.25, 0.0, 0.25, 0.5, 0.999, 1.0, 4.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13), t
    assert stats.t_upper_tail(0.0, 3) == 0.5


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: stats.t_upper_tail(-0.5, 3), "t must be >= 0, got -0.5"),
        (lambda: stats.t_quantile(0.0, 3), r"p must lie in \(0, 1\), got 0.0"),
        (lambda: stats.t_quantile(0.9, 0), "df must be positive, got 0"),
        (lambda: stats.regularized_incomplete_beta(1.5, 1, 1), r"x must lie in \[0, 1\], got 1.5"),
        (lambda: stats.regularized_incomplete_beta(0.5, 0, 1), "a and b must be positive, got a=0, b=1"),
        (lambda: stats.regularized_incomplete_beta(0.5, 1, 0), "a and b must be positive, got a=1, b=0"),
    ],
)
def test_each_domain_error_names_the_bad_value(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_the_continued_fraction_needs_few_terms_on_the_side_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With its term budget cut to 40, I_x(df/2, 1/2) for the t tails of 1..1e6 degrees of freedom is
    still exact: each side of the switch point uses the fraction where it converges fast (on the
    wrong side some need thousands of terms). References: I_x(a, 1) = x^a, I_x(1, b) = 1 - (1-x)^b,
    I_x(1/2, 1/2) = 2 asin(sqrt(x)) / pi, and the t tail of df = 2, P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2."""
    monkeypatch.setattr(stats, "_CF_MAX_ITER", 40)
    for x in (1e-9, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-9):
        assert stats.regularized_incomplete_beta(x, 3.5, 1.0) == pytest.approx(x**3.5, rel=1e-12, abs=1e-300)
        assert stats.regularized_incomplete_beta(x, 1.0, 2.5) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
        arcsine = 2 * math.asin(math.sqrt(x)) / math.pi if x <= 0.5 else 1 - 2 * math.asin(math.sqrt(1 - x)) / math.pi
        assert stats.regularized_incomplete_beta(x, 0.5, 0.5) == pytest.approx(arcsine, rel=1e-12)
    for t in (0.001, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 1000.0):
        assert stats.t_upper_tail(t, 2) == pytest.approx((1 - t / math.sqrt(t * t + 2)) / 2, rel=1e-10), t
        assert stats.t_upper_tail(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10), t
        for df in (3, 10, 100, 1e4, 1e6):
            assert 0.0 <= stats.t_upper_tail(t, df) < 0.5  # no ArithmeticError: converged within the budget


def test_the_continued_fraction_gives_up_after_its_term_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # I_0.3(2, 3) = sum_{j=2..4} C(4, j) 0.3^j 0.7^(4-j) = 0.2646 + 0.0756 + 0.0081; the fraction
    # converges at its third term, so a budget of 3 terms suffices and one of 2 does not.
    monkeypatch.setattr(stats, "_CF_MAX_ITER", 3)
    assert stats.regularized_incomplete_beta(0.3, 2.0, 3.0) == pytest.approx(0.3483, rel=1e-13)
    monkeypatch.setattr(stats, "_CF_MAX_ITER", 2)
    with pytest.raises(ArithmeticError, match=r"did not converge for x=0.3, a=2.0, b=3.0"):
        stats.regularized_incomplete_beta(0.3, 2.0, 3.0)


def test_the_continued_fraction_steps_over_a_zero_denominator() -> None:
    """Lentz's guard: at x = 1/2, a = 1, b = 3 the fraction's first denominator 1 - (a+b)x/(a+1) is
    exactly 0 (the public function never evaluates this side there, but the loop can meet such a
    zero later). Replaced by a tiny number, the fraction still converges to its closed form:
    I_x(1, 3) = 1 - (1-x)^3 = 7/8 = x (1-x)^3 / B(1, 3) * cf / 1, B(1, 3) = 1/3, so cf = 14/3."""
    assert stats._beta_continued_fraction(0.5, 1.0, 3.0) == pytest.approx(14 / 3, rel=1e-14)


def test_results_json_is_read_as_utf8_whatever_the_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON is UTF-8 (RFC 8259); a reader that left the encoding to the locale would turn "é"
    into "Ã©" under a Latin-1 locale. The locale's default is made Latin-1 here for the files
    pathlib opens without an explicit encoding."""
    import io

    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "latin-1")
    (tmp_path / "results.json").write_bytes('{"status": "completed", "model": "r\u00e9tina"}'.encode("utf-8"))
    assert (tmp_path / "results.json").read_text() != (tmp_path / "results.json").read_text(encoding="utf-8")  # the stand-in works
    assert read_results(tmp_path).model == "r\u00e9tina"


# --- VOC AP ----------------------------------------------------------------------------------------

from cbn_detect.evaluation import voc_ap  # noqa: E402

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
    from tests.test_voc_ap import ap_of

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
    det = np.array([[1.0, 1.0, 10.0, 5.0], [40.0, 40.0, 50.0, 50.0], [1.0, 1.0, 10.0, 10.0], [1.0, 1.0, 5.0, 5.0],
                    [1.0, 40.0, 10.0, 50.0],  # overlaps box 0 in x only: iw = 10, ih = -29
                    [11.0, 1.0, 20.0, 10.0],  # touches box 0 on the right: iw = 0 (+1 convention), ih = 10
                    [1.0, 11.0, 10.0, 20.0]])  # touches it below: ih = 0
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
    from tests.test_voc_ap import ap_of

    result = ap_of([[(1, (1, 1, 10, 10), False)]], [[(1, 0.9, (1, 1, 9, 5)), (1, 0.8, (1, 1, 10, 5))]])
    assert result.ap["cat"] == 0.5


def test_no_images_give_no_ap_and_a_nan_map() -> None:
    from cbn_detect.voc import Detections, GroundTruth

    result = voc_ap.evaluate_voc(GroundTruth([], [], [], []), Detections([], [], [], []), ["cat", "dog"])
    assert math.isnan(result.map) and result.ap == {"cat": None, "dog": None} and result.n_pos == {"cat": 0, "dog": 0}
    assert result.to_dict() == {"metric": "voc07", "mAP": None, "ap": {"cat": None, "dog": None}}


def test_evaluation_errors_say_what_is_wrong() -> None:
    from cbn_detect.runtime.errors import ConfigError
    from tests.test_voc_ap import make_dets, make_gt

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


def test_box_conversions_return_float64_whatever_they_are_given() -> None:
    """VOC XML gives integer pixels and a detector float32 boxes: both come back float64 (the
    types' contract), integer input shifted exactly, float32 input widened before the +1."""
    from cbn_detect.voc import voc_to_xyxy, xyxy_to_voc

    xyxy = voc_to_xyxy(np.array([[1, 2, 30, 40]]))
    assert xyxy.dtype == np.float64 and xyxy.tolist() == [[0.0, 1.0, 30.0, 40.0]]
    f32 = np.array([[0.1, 2.7, 30.3, 40.9]], dtype=np.float32)
    voc = xyxy_to_voc(f32)
    assert voc.dtype == np.float64
    assert voc.tolist() == [[float(f32[0, 0]) + 1.0, float(f32[0, 1]) + 1.0, float(f32[0, 2]), float(f32[0, 3])]]


# --- devkit files ------------------------------------------------------------------------------------


def test_devkit_files_round_trip_with_another_prefix_into_a_new_folder_in_file_order(tmp_path: Path, caplog) -> None:
    """comp3 files written into a folder that does not exist yet (parents made) read back per image
    class by class, file order kept within a class - with 40 detections, where an unstable sort of
    the image index would shuffle them. An empty folder reads as no detections, with a warning."""
    from cbn_detect.evaluation.devkit_io import read_detections, write_detections
    from cbn_detect.voc import Detections

    n = 40
    labels = np.array([1 + (k * 7) % 3 for k in range(n)], dtype=np.int64)
    scores = np.linspace(0.9, 0.1, n)
    boxes = np.stack([np.arange(n), np.arange(n), np.arange(n) + 5, np.arange(n) + 5], axis=1).astype(float)
    dets = Detections(["a", "b"], [boxes, boxes[:3]], [scores, scores[:3]], [labels, labels[:3]])
    out = tmp_path / "new" / "results"
    paths = write_detections(dets, ["x", "y", "z"], out, "test", prefix="comp3_det")
    assert [p.name for p in paths] == ["comp3_det_test_x.txt", "comp3_det_test_y.txt", "comp3_det_test_z.txt"]
    back = read_detections(out, ["x", "y", "z"], "test", ["a", "b"], prefix="comp3_det")
    order = np.argsort(labels, kind="stable")  # class by class, file (= array) order within
    assert back.labels[0].tolist() == labels[order].tolist() and back.labels[0].dtype == np.int64
    assert back.scores[0].tolist() == scores[order].tolist()
    assert back.boxes[0].tolist() == boxes[order].tolist()
    assert back.labels[1].tolist() == sorted(labels[:3].tolist())
    empty = tmp_path / "empty"
    empty.mkdir()
    caplog.set_level(logging.WARNING, logger="cbn_detect.evaluation.devkit_io")
    none = read_detections(empty, ["x"], "val", ["a"])
    assert none.labels[0].dtype == np.int64 and none.labels[0].size == 0 and none.boxes[0].shape == (0, 4)
    assert [r.getMessage() for r in caplog.records] == [f"{empty} holds no comp4_det_val_<class>.txt file: no detections"]
