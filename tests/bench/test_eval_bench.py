"""`python -m cbn_detect.bench eval`, run tiny: the table's shape and the agreement check (never
timings, which depend on the machine)."""

from __future__ import annotations

import numpy as np

from cbn_detect.bench.__main__ import main
from cbn_detect.bench.eval import loop_evaluate_voc, run, synthetic_problem
from cbn_detect.evaluation.voc_ap import evaluate_voc


def test_tiny_run_prints_both_implementations_and_agrees(capsys):
    assert run(["--images", "12", "--dets-per-image", "15", "--classes", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["implementation", "seconds", "ratio"]
    rows = [line.split() for line in lines[1:3]]
    assert [r[0] for r in rows] == ["vectorised", "loop"]
    assert all(float(r[1]) >= 0 for r in rows)
    assert rows[0][2] == "1.00"
    assert lines[3].startswith("mAP (voc07): vectorised ")
    assert lines[3].endswith("identical")


def test_the_dispatcher_runs_a_row_and_rejects_an_unknown_one(capsys):
    assert main(["eval", "--images", "12", "--dets-per-image", "15", "--classes", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["implementation", "seconds", "ratio"]
    assert main(["nope"]) == 2
    assert capsys.readouterr().err.startswith(
        "usage: python -m cbn_detect.bench {norm,eval,train,infer,data,gpu,profile}"
    )


def test_synthetic_problem_has_the_requested_size_and_is_seeded():
    gt, dets = synthetic_problem(n_images=7, n_classes=4, dets_per_image=9, seed=5)
    assert len(gt.image_ids) == len(dets.image_ids) == 7
    assert [len(s) for s in dets.scores] == [9] * 7
    assert all(labels.min() >= 1 and labels.max() <= 4 for labels in dets.labels)
    again = synthetic_problem(n_images=7, n_classes=4, dets_per_image=9, seed=5)[1]
    assert all(np.array_equal(a, b) for a, b in zip(dets.boxes, again.boxes))


def test_loop_baseline_matches_on_area_metric_too():
    gt, dets = synthetic_problem(n_images=20, n_classes=3, dets_per_image=12, seed=2)
    names = ["a", "b", "c"]
    assert loop_evaluate_voc(gt, dets, names, "area") == evaluate_voc(gt, dets, names, "area")
