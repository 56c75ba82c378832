"""`python -m cbn_detect.voc_eval`: ground truth -> devkit files -> full marks, and user mistakes
reported on one line with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbn_detect.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_voc
from cbn_detect.evaluation.devkit_io import detection_file, read_ground_truth, write_detections
from cbn_detect.results import Results, write_results
from cbn_detect.voc import Detections
from cbn_detect.voc_eval import main
from tests.conftest import REPO

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


def test_default_classes_are_voc_and_allow_missing_scores_missing_files_as_no_detections(tmp_path, capsys, caplog):
    objects = [("car", 0, 1, 1, 10, 10), ("person", 0, 5, 5, 50, 50)]
    voc = write_voc(tmp_path / "VOC", {"a": objects})
    results = tmp_path / "results"
    results.mkdir()
    detection_file(results, "test", "car").write_text("a 0.7 1 1 10 10\n")  # no person file at all
    out_json = tmp_path / "scores.json"
    argv = ["--voc-dir", str(voc), "--results", str(results), "--json", str(out_json), "--allow-missing"]
    assert main(argv) == 0
    scores = json.loads(out_json.read_text())
    assert scores["ap"]["car"] == 1.0 and scores["ap"]["person"] == 0.0
    assert scores["mAP"] == 0.5
    assert sum(v is None for v in scores["ap"].values()) == 18
    assert len(capsys.readouterr().out.splitlines()) == 1 + 20 + 1
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "no comp4_det_test_<class>.txt for 19 of 20 classes (aeroplane, " in warned[0]
    assert "person" not in warned[0]  # names cut after 10
    assert warned[0].endswith(", ... (9 more)): scored as without detections (AP 0), as --allow-missing says")


def test_malformed_line_is_one_error_line_naming_file_and_line(tmp_path, capsys):
    voc = write_voc(tmp_path / "VOC", {"a": [("car", 0, 1, 1, 10, 10)]})
    results = tmp_path / "results"
    results.mkdir()
    bad = detection_file(results, "test", "car")
    bad.write_text("a 0.7 1 1 10 10\na 0.5 1 1 10\n")
    assert main(["--voc-dir", str(voc), "--results", str(results), "--classes", "car"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"voc_eval: error: {bad}:2: ")


def test_missing_voc_dir_from_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cbn_detect.voc_eval", "--voc-dir", str(tmp_path / "nope"), "--results", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
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


def voc_eval(*args: str | Path) -> subprocess.CompletedProcess:
    """The command as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cbn_detect.voc_eval", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """A small synthetic set (its params.json names the classes) and its ground truth as results."""
    tmp = tmp_path_factory.mktemp("synthetic")
    voc = ensure_synthetic_voc(tmp / "cache", num_train=1, num_val=1, num_test=6, image_size=48)
    return voc, perfect_results(voc, list(SYNTHETIC_CLASSES), tmp / "results")


def test_synthetic_detections_scored_without_classes_from_the_dataset_metadata(synthetic, tmp_path, capsys):
    """The synthetic set's params.json names its classes (in label order): no --classes needed;
    --voc-dir may be the VOCdevkit folder too, as data.root is."""
    voc, results = synthetic
    out_json = tmp_path / "scores.json"
    assert main(["--voc-dir", str(voc.parent), "--results", str(results), "--json", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert list(scores["ap"]) == list(SYNTHETIC_CLASSES)
    assert scores["mAP"] == 1.0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:-1]] == list(SYNTHETIC_CLASSES)


def test_missing_class_files_are_refused_in_one_line_unless_allowed(synthetic, tmp_path):
    voc, perfect = synthetic
    results = tmp_path / "results"
    results.mkdir()
    for name in set(SYNTHETIC_CLASSES) - {"ring", "star"}:  # their files are lost
        detection_file(results, "test", name).write_text(detection_file(perfect, "test", name).read_text())
    done = voc_eval("--voc-dir", voc, "--results", results)
    assert done.returncode == 2
    assert done.stderr == (
        f"voc_eval: error: {results}: no comp4_det_test_<class>.txt for 2 of 6 classes (ring, star); a class "
        "without detections needs an empty file, or pass --classes with the classes to score, or "
        "--allow-missing to score them as without detections\n"
    )

    done = voc_eval("--voc-dir", voc.parent, "--results", results, "--allow-missing")
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"voc_eval: warning: {results}: no comp4_det_test_<class>.txt for 2 of 6 classes (ring, star): "
        "scored as without detections (AP 0), as --allow-missing says\n"
    )
    lines = done.stdout.splitlines()
    assert lines[:4] == [
        f"{voc.parent} is a VOCdevkit folder: scoring its VOC2007",
        f"scoring 6 classes from {voc.parent.parent / 'params.json'}",
        f"ground truth: {voc}, split test (6 images)",
        f"detections: {results}",
    ]
    assert lines[4].split() == ["class", "positives", "AP", "(%)"]


def test_a_binary_result_file_is_named_in_one_line(synthetic, tmp_path):
    voc, perfect = synthetic
    results = tmp_path / "results"
    shutil.copytree(perfect, results)
    binary = detection_file(results, "test", "square")
    binary.write_bytes(b"000001 0.5 1 1 9 9\n\x89PNG\r\n\x1a\n\x00\xff")
    done = voc_eval("--voc-dir", voc, "--results", results)
    assert done.returncode == 2
    assert done.stderr == (
        f"voc_eval: error: {binary}:2: not UTF-8 text (byte 0x89 at offset 19); a result file holds "
        "'<image_id> <score> <xmin> <ymin> <xmax> <ymax>' lines\n"
    )


def test_a_vocdevkit_of_several_years_must_be_told_which(tmp_path, capsys):
    devkit = tmp_path / "VOCdevkit"
    for year in ("VOC2007", "VOC2012"):
        write_voc(devkit / year, SHAPES)
    (devkit / "VOCcode").mkdir()  # the devkit's own code folder is not a year
    assert main(["--voc-dir", str(devkit), "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"voc_eval: error: {devkit} holds VOC2007, VOC2012: say which to score, e.g. --voc-dir {devkit / 'VOC2007'}\n"
    )
    assert main(["--voc-dir", str(devkit / "VOCcode"), "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"voc_eval: error: {devkit / 'VOCcode'}: neither a VOC<year> folder (no Annotations/ or ImageSets/Main/) "
        "nor a VOCdevkit folder holding one\n"
    )


def finished_run(run_dir: Path, voc: Path, detections: Path, **fields) -> Path:
    """A run folder as cbn_detect.train leaves it: results.json and detections/."""
    shutil.copytree(detections, run_dir / "detections")
    results = Results(
        status="completed",
        model="retinanet_tiny",
        norm="bn",
        batch=4,
        world_size=1,
        total_batch=4,
        seed=0,
        data="synthetic",
        dataset_dir=str(voc),
        test_split="test",
        map_voc07=1.0,
        ap_per_class=dict.fromkeys(SYNTHETIC_CLASSES, 1.0),
        **fields,
    )
    write_results(run_dir, results)
    return run_dir


def test_run_takes_the_dataset_split_and_detections_from_results_json(synthetic, tmp_path):
    voc, perfect = synthetic
    run_dir = finished_run(tmp_path / "run", voc, perfect)
    out_json = tmp_path / "scores.json"
    done = voc_eval("--run", run_dir, "--json", out_json)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[:3] == [
        f"scoring 6 classes from {run_dir / 'results.json'}",
        f"ground truth: {voc}, split test (6 images)",
        f"detections: {run_dir / 'detections'}",
    ]
    assert json.loads(out_json.read_text())["ap"] == dict.fromkeys(SYNTHETIC_CLASSES, 1.0)


def test_run_without_what_it_needs_is_one_error_line(synthetic, tmp_path, capsys):
    voc, perfect = synthetic
    old = finished_run(tmp_path / "old", voc, perfect)
    raw = json.loads((old / "results.json").read_text())
    del raw["dataset_dir"], raw["test_split"]  # as cbn_detect wrote it before recording them
    (old / "results.json").write_text(json.dumps(raw))
    assert main(["--run", str(old)]) == 2
    assert capsys.readouterr().err == (
        f"voc_eval: error: {old / 'results.json'} does not record its dataset_dir (an older cbn_detect "
        "wrote it): pass --voc-dir too\n"
    )
    assert main(["--run", str(old), "--voc-dir", str(voc)]) == 0  # split "test", classes from ap_per_class
    capsys.readouterr()

    failed = tmp_path / "failed"
    write_results(failed, Results("failed", "retinanet_tiny", "bn", 4, 1, 4, 0, "synthetic", error="boom"))
    assert main(["--run", str(failed)]) == 2
    assert capsys.readouterr().err == (
        f"voc_eval: error: {failed / 'results.json'}: the run is failed, so it has no final detections to score\n"
    )
    assert main(["--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"voc_eval: error: {tmp_path / 'results.json'} not found: --run wants the folder of a finished run "
        "(or pass --voc-dir and --results)\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--voc-dir", str(voc)])  # neither --run nor --results
    assert exit_info.value.code == 2
    assert "give --run RUN_DIR, or both --voc-dir and --results" in capsys.readouterr().err


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
