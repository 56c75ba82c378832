"""Tests written for mutants that survived `make mutate` in the VOC file readers: the devkit files
(cbn_detect/evaluation/devkit_io.py) and the annotation parser (cbn_detect/voc/annotations.py).

Every expectation is written out by hand from the file contents the test writes (hand-written XML,
split and result files), never computed with the code under test. docs/mutation.md lists the
mutants of these modules that no test can kill (equivalent ones) and why.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    dataset_classes,
    discover_classes,
    read_detections,
    read_ground_truth,
    read_image_ids,
    result_classes,
)
from cbn_detect.voc import devkit_ground_truth, parse_annotation
from cbn_detect.voc.annotations import Annotation, VOCObject, repair_boxes
from cbn_detect.voc.errors import DatasetError

# The 20 classes of PASCAL VOC in the devkit's order (VOCinit.m), written out.
VOC20 = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def write(path: Path, text: str) -> Path:
    """Writes `text` as UTF-8 (whatever the locale), making the folders it needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def latin1_locale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the locale's default encoding Latin-1 for the files pathlib opens without an explicit
    encoding (as on a machine with LANG=de_DE.ISO-8859-1): UTF-8 "é" would then read as "Ã©"."""
    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "latin-1")


# --- devkit files: reading result files and splits ------------------------------------------------


def test_a_non_finite_value_is_reported_on_its_own_line(tmp_path: Path) -> None:
    """Line 4 (after a blank line 2) holds the infinite score; lines 1 and 3 are fine."""
    path = write(tmp_path / "comp4_det_test_car.txt", "a 0.9 1 1 10 10\n\na 0.8 2 2 12 12\na inf 1 1 10 10\n")
    with pytest.raises(DevkitFormatError) as info:
        read_detections(tmp_path, ["car"], "test", ["a"])
    assert str(info.value) == f"{path}:4: score and coordinates must be finite numbers"


def test_an_empty_split_reads_as_no_images(tmp_path: Path) -> None:
    """No image ids (an empty split file) give no images at all, not one image without detections."""
    write(tmp_path / "voc" / "ImageSets" / "Main" / "test.txt", "\n")
    write(tmp_path / "results" / "comp4_det_test_car.txt", "")
    image_ids = read_image_ids(tmp_path / "voc", "test")
    assert image_ids == []
    dets = read_detections(tmp_path / "results", ["car"], "test", image_ids)
    assert (dets.image_ids, dets.boxes, dets.scores, dets.labels) == ([], [], [], [])


def test_unknown_classes_are_all_named_with_the_way_out(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    write(voc / "ImageSets" / "Main" / "test.txt", "1\n")
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for name in ("horse", "dog", "cow")
    )
    xml = write(voc / "Annotations" / "1.xml", f"<annotation><size><width>10</width><height>10</height></size>{objects}</annotation>")
    with pytest.raises(DevkitFormatError) as info:
        read_ground_truth(voc, "test", ["dog", "cat"])
    assert str(info.value) == (
        f"{xml}: class cow, horse not among the 2 classes scored (use --classes for datasets other than VOC)"
    )


def test_devkit_files_are_read_as_utf8_whatever_the_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split file, the result files and the dataset's params.json are written UTF-8 (by us and
    by the devkit's own tools on any modern system); read with the locale's encoding, an image id
    "café" would become "cafÃ©", which is not in the split."""
    latin1_locale(monkeypatch)
    voc = tmp_path / "ds" / "VOCdevkit" / "VOC2007"
    split = write(voc / "ImageSets" / "Main" / "test.txt", "caf\u00e9\nna\u00efve\n")
    assert split.read_text() != split.read_text(encoding="utf-8")  # the stand-in locale works
    assert read_image_ids(voc, "test") == ["caf\u00e9", "na\u00efve"]
    write(tmp_path / "results" / "comp4_det_test_car.txt", "na\u00efve 0.25 1 2 10 20\n")
    dets = read_detections(tmp_path / "results", ["car"], "test", ["caf\u00e9", "na\u00efve"])
    assert [s.tolist() for s in dets.scores] == [[], [0.25]]
    assert dets.boxes[1].tolist() == [[0.0, 1.0, 10.0, 20.0]]
    params = write(tmp_path / "ds" / "params.json", '{"classes": ["caf\u00e9", "th\u00e9"]}')
    assert dataset_classes(voc) == (("caf\u00e9", "th\u00e9"), params)


# --- devkit files: which classes to score (voc_eval without --classes) ---------------------------------


def test_result_classes_are_the_names_of_this_splits_files_with_this_prefix(tmp_path: Path) -> None:
    for name in ("comp4_det_test_dog.txt", "comp4_det_test_car.txt", "comp4_det_val_cat.txt", "comp3_det_test_bird.txt",
                 "comp4_det_test_.txt",  # no class name at all
                 "comp4_det_test_cow.txt.bak", "comp4_det_test_horse.csv"):
        write(tmp_path / name, "")
    (tmp_path / "comp4_det_test_sheep.txt").mkdir()  # a folder, not a file
    assert result_classes(tmp_path, "test") == ["car", "dog"]
    assert result_classes(tmp_path, "val") == ["cat"]
    assert result_classes(tmp_path, "test", prefix="comp3_det") == ["bird"]
    assert result_classes(tmp_path, "train") == []
    with pytest.raises(FileNotFoundError) as info:
        result_classes(tmp_path / "absent", "test")
    assert str(info.value) == f"{tmp_path / 'absent'}: results directory not found"


def test_a_dataset_states_its_classes_two_folders_above_its_voc_folder(tmp_path: Path) -> None:
    voc = tmp_path / "ds" / "VOCdevkit" / "VOC2007"
    voc.mkdir(parents=True)
    assert dataset_classes(voc) is None  # real VOC states none
    params = write(tmp_path / "ds" / "params.json", json.dumps({"classes": ["circle", "square"], "seed": 3}))
    assert dataset_classes(voc) == (("circle", "square"), params)
    assert discover_classes(voc, ["car"]) == (("circle", "square"), str(params))  # before the result files


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        ("not json", "not a dataset description (Expecting value: line 1 column 1 (char 0))"),
        ('["circle"]', "not a dataset description ('list' object has no attribute 'get')"),
        ('{"classes": "circle"}', "its 'classes' is not a list of class names"),
        ('{"classes": []}', "its 'classes' is not a list of class names"),
        ('{"classes": ["circle", ""]}', "its 'classes' is not a list of class names"),
        ('{"classes": ["circle", 3]}', "its 'classes' is not a list of class names"),
        ('{"image_size": 48}', None),  # someone else's params.json: no classes, nothing to say
    ],
)
def test_a_params_json_without_class_names_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, warning: str | None
) -> None:
    voc = tmp_path / "ds" / "VOCdevkit" / "VOC2007"
    voc.mkdir(parents=True)
    params = write(tmp_path / "ds" / "params.json", content)
    caplog.set_level(logging.WARNING, logger="cbn_detect.evaluation.devkit_io")
    assert dataset_classes(voc) is None
    assert [r.getMessage() for r in caplog.records] == ([] if warning is None else [f"{params} ignored: {warning}"])


def test_without_metadata_classes_come_from_result_files_only_when_voc_lacks_one(tmp_path: Path) -> None:
    voc = tmp_path / "plain" / "VOCdevkit" / "VOC2007"
    voc.mkdir(parents=True)
    assert discover_classes(voc, []) == (VOC20, "VOC's 20 classes")
    assert discover_classes(voc, ["car", "dog"]) == (VOC20, "VOC's 20 classes")  # a VOC subset: still VOC's 20
    assert discover_classes(voc, sorted(VOC20)) == (VOC20, "VOC's 20 classes")  # all of them, in VOC's order
    assert discover_classes(voc, ["car", "circle"]) == (("car", "circle"), "the result files present")


# --- annotations -------------------------------------------------------------------------------------


def annotation(tmp_path: Path, body: str, name: str = "2008_000001.xml") -> Path:
    return write(tmp_path / name, f"<annotation>{body}</annotation>")


SIZE = "<size><width>500</width><height>375</height><depth>3</depth></size>"


def box(xmin: object, ymin: object, xmax: object, ymax: object) -> str:
    return f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"


def test_an_annotation_reads_as_written_with_the_voc_quirks(tmp_path: Path) -> None:
    """A VOC2012-style file: the file name it states, a person whose <part>s (with their own
    names and boxes) come before its own box and who has no <difficult>, a float coordinate, a
    name with white space around it, a truncated difficult dog."""
    path = annotation(
        tmp_path,
        "<folder>VOC2012</folder><filename>2008_000001.jpg</filename>" + SIZE
        + "<object><name>person</name><pose>Left</pose><truncated>1</truncated>"
        "<part><name>head</name>" + box(300, 20, 340, 60) + "</part>"
        "<part><name>hand</name>" + box(280, 100, 290, 110) + "</part>"
        + box(273.5, 12, 400, 375) + "</object>"
        "<object><name>\n\t\tdog </name><truncated>1</truncated><difficult>1</difficult>" + box(1, 1, 50, 40) + "</object>",
        name="other_stem.xml",
    )
    assert parse_annotation(path) == Annotation(
        filename="2008_000001.jpg",
        width=500,
        height=375,
        objects=(VOCObject("person", False, (273.5, 12.0, 400.0, 375.0)), VOCObject("dog", True, (1.0, 1.0, 50.0, 40.0))),
    )


def test_an_annotation_without_filename_names_the_jpeg_after_itself(tmp_path: Path) -> None:
    """No <filename>: the image is <stem>.jpg. An empty <name/> is the class "" (then reported as
    an unknown class by whoever reads the labels), not some made-up name."""
    path = annotation(tmp_path, SIZE + "<object><name/>" + box(1, 2, 3, 4) + "</object>", name="000042.xml")
    assert parse_annotation(path) == Annotation("000042.jpg", 500, 375, (VOCObject("", False, (1.0, 2.0, 3.0, 4.0)),))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<filename>a.jpg</filename>", "<annotation> has no <size>"),
        ("<size><height>375</height></size>", "<size> has no <width>"),
        (SIZE + "<object>" + box(1, 1, 5, 5) + "</object>", "<object> has no <name>"),
        (SIZE + "<object><name>dog</name><difficult>0</difficult></object>", "<object> has no <bndbox>"),
        (SIZE + "<object><name>dog</name><bndbox><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
         "<bndbox> has no <xmin>"),
        (SIZE + "<object><name>dog</name><difficult>2</difficult>" + box(1, 1, 5, 5) + "</object>",
         "object 'dog': <difficult> must be 0 or 1, got '2'"),
    ],
)
def test_a_malformed_annotation_names_the_file_and_what_is_missing(tmp_path: Path, body: str, message: str) -> None:
    path = annotation(tmp_path, body)
    with pytest.raises(DatasetError) as info:
        parse_annotation(path)
    assert str(info.value) == f"{path}: {message}"
    assert info.value.kind == "malformed_annotation"


@pytest.mark.parametrize(
    ("width", "height", "shown"),
    [
        ("0", "375", "width=0.0 height=375.0"),
        ("500", "0", "width=500.0 height=0.0"),
        ("-500", "375", "width=-500.0 height=375.0"),
        ("500.5", "375", "width=500.5 height=375.0"),
        ("500", "375.5", "width=500.0 height=375.5"),
    ],
)
def test_an_image_size_must_be_positive_integers(tmp_path: Path, width: str, height: str, shown: str) -> None:
    path = annotation(tmp_path, f"<size><width>{width}</width><height>{height}</height></size>")
    with pytest.raises(DatasetError) as info:
        parse_annotation(path)
    assert str(info.value) == f"{path}: image size must be positive integers, got {shown}"
    assert info.value.kind == "malformed_annotation"


def test_a_one_pixel_image_is_a_valid_size(tmp_path: Path) -> None:
    path = annotation(tmp_path, "<size><width>1</width><height>1.0</height></size>", name="dot.xml")
    assert parse_annotation(path) == Annotation("dot.jpg", 1, 1, ())


def test_a_missing_annotation_file_is_its_own_kind_of_problem(tmp_path: Path) -> None:
    path = tmp_path / "absent.xml"
    with pytest.raises(DatasetError) as info:
        parse_annotation(path)
    assert str(info.value) == f"{path}: cannot read annotation (No such file or directory)"
    assert info.value.kind == "missing_annotation"


def test_an_image_without_objects_has_empty_ground_truth_of_the_documented_dtypes(tmp_path: Path) -> None:
    """GroundTruth: labels int64, difficult bool, also when an image has no object (numpy would
    make an empty list float64)."""
    empty = parse_annotation(annotation(tmp_path, SIZE, name="empty.xml"))
    gt = devkit_ground_truth([("empty", empty)], ["dog"])
    assert gt.image_ids == ["empty"]
    assert gt.boxes[0].shape == (0, 4)
    assert gt.labels[0].shape == (0,) and gt.labels[0].dtype == np.int64
    assert gt.difficult[0].shape == (0,) and gt.difficult[0].dtype == np.bool_


def test_a_box_below_the_image_has_no_height_left_and_is_dropped(tmp_path: Path) -> None:
    """500 x 375 image. VOC (10, 380, 20, 390) is continuous (9, 379, 20, 390): clipped to
    (9, 375, 20, 375), no height left. VOC (1, 1, 500, 375) is the whole image: kept as is."""
    path = annotation(
        tmp_path,
        SIZE + "<object><name>dog</name>" + box(10, 380, 20, 390) + "</object>"
        "<object><name>cat</name>" + box(1, 1, 500, 375) + "</object>",
    )
    boxes, clipped, keep = repair_boxes(parse_annotation(path))
    assert boxes.tolist() == [[9.0, 375.0, 20.0, 375.0], [0.0, 0.0, 500.0, 375.0]]
    assert clipped.tolist() == [True, False]
    assert keep.tolist() == [False, True]

