"""Detection pictures: the report's grid per (model, batch) from the jobs' devkit files, and the
images with boxes every evaluation sends to W&B (read back from the offline run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from shutil import copytree

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from PIL import Image

from cbn_detect.evaluation.devkit_io import write_detections
from cbn_detect.evaluation.pictures import (
    LABEL_PAD,
    class_color,
    draw_boxes,
    draw_labelled,
    job_test_split,
    load_examples,
    pick_images,
    place_labels,
    read_image_detections,
)
from cbn_detect.report import main as report_main
from cbn_detect.tracking.wandb_reader import logged_images, wait_for_run
from cbn_detect.voc import Detections, GroundTruth
from tests.conftest import REPO, TINY_RUN

CLASSES = ("circle", "square", "triangle")


def _rgb(color: str) -> list[int]:
    return [int(color[i : i + 2], 16) for i in (1, 3, 5)]


def test_the_pictured_images_are_the_first_with_an_object_that_is_not_difficult() -> None:
    gt = GroundTruth(
        image_ids=["a", "b", "c", "d", "e"],
        boxes=[np.zeros((0, 4)), np.zeros((1, 4)), np.zeros((1, 4)), np.zeros((2, 4)), np.zeros((1, 4))],
        labels=[np.zeros(0, int), np.ones(1, int), np.ones(1, int), np.ones(2, int), np.ones(1, int)],
        difficult=[np.zeros(0, bool), np.ones(1, bool), np.zeros(1, bool), np.array([True, False]), np.zeros(1, bool)],
    )
    assert pick_images(gt, 2) == [2, 3]  # "a" has no object, "b" only a difficult one
    assert pick_images(gt, 4) == [0, 2, 3, 4]  # too few: the others fill in, in split order
    assert pick_images(gt, 0) == []


def test_only_the_pictured_images_are_read_back_from_the_devkit_files(tmp_path: Path) -> None:
    boxes = [
        np.array([[0.0, 1.5, 10.25, 20.0], [3.0, 4.0, 5.0, 6.0]]),
        np.array([[7.0, 8.0, 9.0, 10.0]]),
        np.zeros((0, 4)),
    ]
    dets = Detections(
        image_ids=["x1", "x2", "x3"],
        boxes=boxes,
        scores=[np.array([0.9, 0.2]), np.array([0.5]), np.zeros(0)],
        labels=[np.array([1, 3]), np.array([2]), np.zeros(0, int)],
    )
    write_detections(dets, CLASSES, tmp_path, "test")
    found = read_image_detections(tmp_path, "test", CLASSES, ["x1", "x3"])
    assert sorted(found) == ["x1", "x3"]
    got_boxes, got_scores, got_labels = found["x1"]
    order = np.argsort(got_labels)  # the files are per class
    np.testing.assert_array_equal(got_boxes[order], boxes[0])
    np.testing.assert_array_equal(got_scores[order], [0.9, 0.2])
    np.testing.assert_array_equal(got_labels[order], [1, 3])
    assert found["x3"][0].shape == (0, 4) and found["x3"][1].size == 0


def test_boxes_are_drawn_in_their_class_colour_at_their_place_and_scaled_with_the_image() -> None:
    image = torch.zeros(3, 100, 80, dtype=torch.uint8)
    box = np.array([[10.0, 20.0, 50.0, 60.0]])
    drawn = draw_boxes(image, box, np.array([2]), CLASSES, scores=np.array([0.75]), side=None)
    assert drawn.shape == (3, 100, 80) and drawn.dtype == torch.uint8
    assert drawn[:, 40, 10].tolist() == _rgb(class_color(2))  # the left edge, half-way down
    assert drawn[:, 40, 30].tolist() == [0, 0, 0]  # inside: not filled
    big = draw_boxes(image, box, np.array([1]), CLASSES, difficult=np.array([True]), side=200)
    assert big.shape == (3, 200, 160)
    assert big[:, 80, 20].tolist() == _rgb(class_color(1))  # the same edge, twice as far
    assert draw_boxes(image, np.zeros((0, 4)), np.zeros(0, int), CLASSES, side=None).equal(image)


def _overlapping(rects: list) -> list[tuple[int, int]]:
    """Index pairs of rectangles (x0, y0, x1, y1; x1, y1 exclusive) that share a pixel."""
    return [
        (i, j)
        for i, a in enumerate(rects)
        for j, b in enumerate(rects[:i])
        if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    ]


def _touches(rect: tuple, box: np.ndarray) -> bool:
    """The label rectangle shares a pixel with its box or sits right above or below it (boxes are
    drawn at whole pixels: one pixel of rounding either way)."""
    return rect[0] <= box[2] + 1 and box[0] - 1 <= rect[2] and box[1] - (rect[3] - rect[1]) - 1 <= rect[1] <= box[3] + 1


def test_labels_go_above_else_inside_else_below_and_never_overlap() -> None:
    # four boxes with nearly the same top edge, stacked: the labels must find four different places
    boxes = np.array([[20, 40, 90, 90], [22, 41, 92, 95], [24, 42, 94, 99], [26, 43, 96, 99]], dtype=float)
    spots = place_labels(boxes, [(40, 12)] * 4, width=120, height=120)
    assert spots[0] == (20, 28, 60, 40)  # above the best box
    assert spots[1] == (22, 41, 62, 53)  # the place above is taken: inside the top
    assert spots[2] == (24, 99, 64, 111)  # above and inside taken: below the box
    assert spots[3] == (26, 53, 66, 65)  # all three taken: moved down past the label in the way
    assert _overlapping(spots) == []
    # at the top of the picture there is no room above: inside the top, kept inside the picture
    assert place_labels(np.array([[110.0, 0.0, 119.0, 30.0]]), [(40, 12)], 120, 120) == [(80, 0, 120, 12)]
    # a label that fits nowhere near its box is left out rather than put beside another box
    crowded = place_labels(np.array([[0.0, 0.0, 50.0, 10.0]] * 4), [(30, 8)] * 4, 60, 40)
    assert crowded[0] == (0, 0, 30, 8) and crowded[1] == (0, 10, 30, 18) and crowded[2:] == [None, None]


def test_a_crowded_picture_gets_labels_that_do_not_overlap() -> None:
    rng = np.random.default_rng(0)
    corners = 30 + rng.uniform(-10, 10, size=(14, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(20, 60, size=(14, 2))], axis=1)
    labels = rng.integers(1, 4, size=14)
    scores = rng.uniform(0.3, 1.0, size=14)
    image = torch.full((3, 128, 128), 90, dtype=torch.uint8)
    drawing = draw_labelled(image, boxes, labels, CLASSES, scores=scores, side=320)
    placed = [(i, spot) for i, spot in enumerate(drawing.labels) if spot is not None]
    assert len(drawing.labels) == 14 and len(placed) >= 8 and drawing.unlabelled == 14 - len(placed)
    assert _overlapping([spot for _, spot in placed]) == []
    assert all(_touches(spot, boxes[i] * 2.5) for i, spot in placed)  # 128 -> 320 px
    assert drawing.labels[int(np.argmax(scores))] is not None  # the best detection keeps its label
    for i, (x0, y0, x1, y1) in placed:  # drawn where placed: the label's colour fills its corners
        assert drawing.image[:, y0, x0].tolist() == _rgb(class_color(int(labels[i]))), i
        assert drawing.image[:, y1 - 1, x1 - 1].tolist() == _rgb(class_color(int(labels[i]))), i
        assert (drawing.image[:, y0 + LABEL_PAD : y1 - LABEL_PAD, x0:x1] > 200).all(dim=0).any()  # white text
    again = draw_labelled(image, boxes, labels, CLASSES, scores=scores, side=320)
    assert again.image.equal(drawing.image) and again.labels == drawing.labels  # deterministic


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-job tiny sweep (bn, gn) with offline W&B; every detection in the W&B images (score 0)."""
    root = tmp_path_factory.mktemp("pictures")
    sweep = root / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbn_detect.train",
            "-m",
            *TINY_RUN,
            f"hydra.sweep.dir={sweep}",
            "norm=bn,gn",
            "wandb.mode=offline",
            "eval.coco=false",
            "eval.image_score=0",
            "eval.log_images=3",
            "model.score_thresh=0.001",
        ],  # 8 steps of training: keep the low scores, so that there are boxes
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_each_evaluation_sends_images_with_ground_truth_and_detection_boxes_to_w_and_b(sweep: Path) -> None:
    job = sweep / "retinanet_tiny" / "bn" / "batch_4" / "seed_0"
    run = wait_for_run(job / "wandb")
    results = json.loads((job / "results.json").read_text())
    (row,) = [row for row in run.history if "eval/examples" in row]
    assert row["_step"] == results["steps"] and "eval/map_voc07" in row  # beside the evaluation's numbers
    images = logged_images(run, row["eval/examples"])
    split = job_test_split(job)
    indices = pick_images(split.gt, 3)
    assert [image.caption for image in images] == [split.gt.image_ids[i] for i in indices]
    examples = load_examples(
        split.dataset, split.gt, job / "detections", split.split, split.classes, indices, score=0.0
    )
    for image, example in zip(images, examples):
        assert image.path.is_file() and image.path.suffix == ".png"
        assert Image.open(image.path).size == (example.image.shape[2], example.image.shape[1]) == (64, 64)
        assert set(image.boxes) == {"predictions", "ground_truth"}
        truth, predictions = image.boxes["ground_truth"], image.boxes["predictions"]
        assert truth["class_labels"] == {str(i): name for i, name in enumerate(split.classes, start=1)}
        got = [(b["class_id"], [b["position"][k] for k in ("minX", "minY", "maxX", "maxY")]) for b in truth["box_data"]]
        assert got == [(int(label), box.tolist()) for label, box in zip(example.gt_labels, example.gt_boxes)]
        assert all(b["domain"] == "pixel" for b in truth["box_data"] + predictions["box_data"])
        # every detection of the devkit files (score >= 0), best first, with its score
        assert len(predictions["box_data"]) == len(example.scores) > 0
        assert [b["scores"]["score"] for b in predictions["box_data"]] == pytest.approx(example.scores.tolist())
        assert [b["class_id"] for b in predictions["box_data"]] == example.labels.tolist()
        first = predictions["box_data"][0]["position"]
        assert [first[k] for k in ("minX", "minY", "maxX", "maxY")] == pytest.approx(example.boxes[0].tolist())


def test_the_report_draws_a_grid_of_ground_truth_and_each_norms_detections(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_main([str(sweep), "--images", "3", "--score", "0.05"]) == 0
    assert "detections_retinanet_tiny_b4.png" in capsys.readouterr().out
    picture = sweep / "detections_retinanet_tiny_b4.png"
    pixels = mpimg.imread(picture)
    height, width = pixels.shape[:2]
    assert 0.6 < height / width < 1.1  # 3 rows (ground truth, bn, gn) x 3 images, and a title
    report = (sweep / "report.md").read_text()
    assert "## Detections" in report and "](detections_retinanet_tiny_b4.png)" in report
    assert "bn: `retinanet_tiny/bn/batch_4/seed_0`, gn: `retinanet_tiny/gn/batch_4/seed_0`" in report
    assert "at least 0.05" in report

    assert report_main([str(sweep), "--images", "0"]) == 0  # no pictures asked: none in the report
    assert "## Detections" not in (sweep / "report.md").read_text()


def test_a_job_whose_dataset_cannot_be_built_is_left_out_with_a_warning(
    sweep: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "sweep"
    copytree(sweep, copy, ignore=lambda d, names: [n for n in names if n == "wandb"])
    config = copy / "retinanet_tiny" / "gn" / "batch_4" / "seed_0" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("source:", "old_source:"))  # an older config layout
    assert report_main([str(copy), "--images", "2"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("retinanet_tiny/gn/batch_4/seed_0: no detection picture" in w and "data.source" in w for w in warnings)
    report = (copy / "report.md").read_text()
    assert "Jobs: bn: `retinanet_tiny/bn/batch_4/seed_0`." in report
