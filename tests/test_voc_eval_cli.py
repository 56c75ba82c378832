"""`python -m cbn_detect.voc_eval`: ground truth -> devkit files -> full marks, and user mistakes
reported on one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbn_detect.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_voc
from cbn_detect.evaluation.devkit_io import detection_file, read_ground_truth, write_detections
from cbn_detect.voc import Detections
from cbn_detect.voc_eval import main

REPO = Path(__file__).resolve().parents[1]

XML = "<annotation><size><width>100</width><height>80</height></size>{}</annotation>"
OBJECT = (
    "<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin>"
    "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
)


def write_voc(root: Path, images: dict[str, list[tuple]], split: str = "test") -> Path:
    """images: id -> [(name, difficult, xmin, ymin, xmax, ymax)]."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    for image_id, objects in images.items():
        xml = XML.format("".join(OBJECT.format(*o) for o in objects))
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    return root


SHAPES = {
    "000001": [("circle", 0, 1, 1, 30, 30), ("square", 0, 40, 10, 90, 70)],
    "000002": [("circle", 1, 5, 5, 20, 20), ("star", 1, 50, 50, 60, 60)],
    "000003": [],
}


def perfect_results(voc_dir: Path, classes: list[str], out: Path) -> Path:
    """Every ground-truth object (difficult ones too) detected exactly, as devkit files."""
    gt = read_ground_truth(voc_dir, "test", classes)
    dets = Detections(gt.image_ids, gt.boxes, [np.ones(len(b)) for b in gt.boxes], gt.labels)
    write_detections(dets, classes, out, "test")
    return out


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_ground_truth_written_as_results_scores_full_marks(tmp_path, capsys, metric):
    classes = ["circle", "square", "star"]
    voc = write_voc(tmp_path / "VOC", SHAPES)
    results = perfect_results(voc, classes, tmp_path / "results")
    out_json = tmp_path / "scores.json"
    argv = ["--voc-dir", str(voc), "--results", str(results), "--classes", ",".join(classes)]
    assert main([*argv, "--metric", metric, "--json", str(out_json)]) == 0

    assert json.loads(out_json.read_text()) == {
        "metric": metric,
        "mAP": 1.0,
        "ap": {"circle": 1.0, "square": 1.0, "star": None},  # star: only a difficult object
    }
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["class", "positives", "AP", "(%)"]
    assert table[1].split() == ["circle", "1", "100.00"]
    assert table[3].split()[:3] == ["star", "0", "n/a"]
    assert table[-1].split() == ["mAP", "100.00", f"({metric})"]


def test_default_classes_are_voc_and_missing_class_files_mean_no_detections(tmp_path, capsys):
    objects = [("car", 0, 1, 1, 10, 10), ("person", 0, 5, 5, 50, 50)]
    voc = write_voc(tmp_path / "VOC", {"a": objects})
    results = tmp_path / "results"
    results.mkdir()
    detection_file(results, "test", "car").write_text("a 0.7 1 1 10 10\n")  # no person file at all
    out_json = tmp_path / "scores.json"
    assert main(["--voc-dir", str(voc), "--results", str(results), "--json", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert scores["ap"]["car"] == 1.0 and scores["ap"]["person"] == 0.0
    assert scores["mAP"] == 0.5
    assert sum(v is None for v in scores["ap"].values()) == 18
    assert len(capsys.readouterr().out.splitlines()) == 1 + 20 + 1


def test_malformed_line_is_one_error_line_naming_file_and_line(tmp_path, capsys):
    voc = write_voc(tmp_path / "VOC", {"a": [("car", 0, 1, 1, 10, 10)]})
    results = tmp_path / "results"
    results.mkdir()
    bad = detection_file(results, "test", "car")
    bad.write_text("a 0.7 1 1 10 10\na 0.5 1 1 10\n")
    assert main(["--voc-dir", str(voc), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"voc_eval: error: {bad}:2: ")


def test_missing_voc_dir_from_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cbn_detect.voc_eval", "--voc-dir", str(tmp_path / "nope"),
         "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == f"voc_eval: error: {tmp_path / 'nope'}: VOC directory not found\n"
    assert done.stdout == ""


def test_missing_results_dir_and_unknown_metric(tmp_path, capsys):
    voc = write_voc(tmp_path / "VOC", {"a": []})
    assert main(["--voc-dir", str(voc), "--results", str(tmp_path / "none")]) == 2
    assert "results directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--voc-dir", str(voc), "--results", str(tmp_path), "--metric", "coco"])
    assert exit_info.value.code == 2


def test_synthetic_detections_scored_without_classes_from_the_dataset_metadata(tmp_path, capsys):
    """The synthetic set's params.json names its classes (in label order): no --classes needed,
    also when some class files are missing (they mean no detections)."""
    voc = ensure_synthetic_voc(tmp_path / "cache", num_train=1, num_val=1, num_test=6, image_size=48)
    results = perfect_results(voc, list(SYNTHETIC_CLASSES), tmp_path / "results")
    for name in SYNTHETIC_CLASSES[1:]:
        detection_file(results, "test", name).unlink()  # only circle's file is left
    out_json = tmp_path / "scores.json"
    assert main(["--voc-dir", str(voc), "--results", str(results), "--json", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert list(scores["ap"]) == list(SYNTHETIC_CLASSES)
    assert scores["ap"]["circle"] == 1.0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:-1]] == list(SYNTHETIC_CLASSES)


def test_classes_come_from_the_result_files_when_they_are_not_voc(tmp_path):
    voc = write_voc(tmp_path / "VOC", SHAPES)
    results = perfect_results(voc, ["circle", "square", "star"], tmp_path / "results")
    out_json = tmp_path / "scores.json"
    assert main(["--voc-dir", str(voc), "--results", str(results), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["ap"] == {"circle": 1.0, "square": 1.0, "star": None}


@pytest.mark.parametrize("case", ["empty folder", "other split", "wrong classes"])
def test_no_result_file_to_score_is_one_error_line(tmp_path, capsys, case):
    voc = write_voc(tmp_path / "VOC", SHAPES)
    results = tmp_path / "results"
    results.mkdir()
    argv = ["--voc-dir", str(voc), "--results", str(results)]
    if case == "other split":
        detection_file(results, "val", "circle").write_text("000001 0.9 1 1 30 30\n")
    if case == "wrong classes":
        detection_file(results, "test", "circle").write_text("000001 0.9 1 1 30 30\n")
        argv += ["--classes", "car,dog"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("voc_eval: error: ")
    if case == "wrong classes":
        assert "none of the 2 classes scored" in captured.err
    else:
        assert f"{results} holds no comp4_det_test_<class>.txt file" in captured.err
