"""Devkit-format result files (exact round trip, errors naming file and line) and ground truth."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbn_detect.bench.eval import synthetic_problem
from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    dataset_classes,
    detection_file,
    discover_classes,
    read_detections,
    read_ground_truth,
    read_image_ids,
    result_classes,
    write_detections,
)
from cbn_detect.evaluation.voc_ap import evaluate_voc
from cbn_detect.voc import Detections, xyxy_to_voc
from tests.conftest import write

CLASSES = ("cat", "dog", "emu")


def dets_of(rows_per_image: dict[str, list[tuple]]) -> Detections:
    """rows: (label, score, x1, y1, x2, y2) in continuous xyxy."""
    arrays = [np.array(rows, dtype=float).reshape(-1, 6) for rows in rows_per_image.values()]
    return Detections(
        image_ids=list(rows_per_image),
        boxes=[a[:, 2:] for a in arrays],
        scores=[a[:, 1] for a in arrays],
        labels=[a[:, 0].astype(np.int64) for a in arrays],
    )


def assert_same(a: Detections, b: Detections) -> None:
    """Bit-exact equality of what the devkit sees: scores, labels and the VOC-convention boxes.

    The continuous x1, y1 themselves need not survive: the file holds x1 + 1, and
    (x1 + 1) - 1 rounds for some doubles (0.1 comes back as 0.10000000000000009). Adding 1 again
    gives the written value exactly whenever x1 + 1 >= 0.5, so the evaluation cannot change.
    """
    assert a.image_ids == b.image_ids
    for x, y in zip(a.boxes, b.boxes):
        np.testing.assert_array_equal(xyxy_to_voc(x), xyxy_to_voc(y))
        np.testing.assert_array_equal(x[:, 2:], y[:, 2:])
    for field in ("scores", "labels"):
        for x, y in zip(getattr(a, field), getattr(b, field)):
            np.testing.assert_array_equal(x, y)


def test_files_hold_devkit_lines_in_voc_pixel_convention(tmp_path):
    dets = dets_of({"000001": [(1, 0.5, 0.0, 0.0, 10.0, 10.0)], "000002": []})
    paths = write_detections(dets, CLASSES, tmp_path, "test")
    assert [p.name for p in paths] == [f"comp4_det_test_{c}.txt" for c in CLASSES]
    assert paths[0].read_text() == "000001 0.5 1.0 1.0 10.0 10.0\n"
    assert paths[1].read_text() == paths[2].read_text() == ""  # empty classes still get a file
    # No temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_round_trip_is_exact_and_keeps_order_within_image(tmp_path):
    third = 1 / 3
    f32 = float(np.float32(0.123456789))
    dets = dets_of(
        {
            "a": [
                (2, third, 0.1, 0.2, 5.3, 7.7),
                (1, f32, 1e-3, 2.0, 3.0, 4.0),
                (2, third, 9.0, 9.0, 12.5, 20.0),
            ],
            "b": [],
            "c": [(3, 0.1 + 0.2, 100.25, 50.0, 300.75, 375.0)],
        }
    )
    write_detections(dets, CLASSES, tmp_path, "val")
    back = read_detections(tmp_path, CLASSES, "val", ["a", "b", "c"])
    # Within an image the reader groups by class (class files are read in class order) and keeps
    # file order inside a class: the only order the devkit's tie-breaking can see.
    order = [1, 0, 2]
    expected = Detections(
        image_ids=dets.image_ids,
        boxes=[dets.boxes[0][order], dets.boxes[1], dets.boxes[2]],
        scores=[dets.scores[0][order], dets.scores[1], dets.scores[2]],
        labels=[dets.labels[0][order], dets.labels[1], dets.labels[2]],
    )
    assert_same(back, expected)


def finite(low: float) -> st.SearchStrategy[float]:
    return st.floats(allow_nan=False, allow_infinity=False, min_value=low, max_value=1e6)


corner = finite(-0.5)  # x1 + 1 >= 0.5: boxes reaching further out of the image are not produced
row = st.tuples(finite(-1e6), corner, corner, finite(-1e6), finite(-1e6))


@settings(max_examples=30, deadline=None)
@given(st.lists(row, min_size=1, max_size=5))
def test_any_finite_float_round_trips_bit_exactly(tmp_path_factory, rows):
    out = tmp_path_factory.mktemp("rt")
    dets = dets_of({"img": [(1, *r) for r in rows]})
    write_detections(dets, CLASSES, out, "test")
    assert_same(read_detections(out, CLASSES, "test", ["img"]), dets)


def test_scores_of_a_run_survive_its_files(tmp_path):
    gt, dets = synthetic_problem(n_images=60, n_classes=3, dets_per_image=20, seed=1)
    write_detections(dets, CLASSES, tmp_path, "test")
    back = read_detections(tmp_path, CLASSES, "test", gt.image_ids)
    for metric in ("voc07", "area"):
        assert evaluate_voc(gt, back, CLASSES, metric) == evaluate_voc(gt, dets, CLASSES, metric)


def test_missing_class_file_means_no_detections(tmp_path):
    detection_file(tmp_path, "test", "dog").write_text("x 0.9 1 1 5 5\ny 0.8 2 2 6 6\n")
    back = read_detections(tmp_path, CLASSES, "test", ["x", "y", "z"])
    assert [len(s) for s in back.scores] == [1, 1, 0]
    assert back.labels[0].tolist() == [2]
    np.testing.assert_array_equal(back.boxes[1], [[1.0, 1.0, 6.0, 6.0]])


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("x 0.9 1 1 5 5\nx 0.9 1 1 5\n", 2, "expected '<image_id>"),
        ("\nx 0.9 1 1 5 five\n", 2, "expected numbers"),
        ("x 0.9 1 1 5 5\n\nnope 0.9 1 1 5 5\n", 3, "'nope' is not in the split"),
        ("x nan 1 1 5 5\n", 1, "finite"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, content, line, reason):
    path = detection_file(tmp_path, "test", "emu")
    path.write_text(content)
    with pytest.raises(DevkitFormatError, match=reason) as info:
        read_detections(tmp_path, CLASSES, "test", ["x"])
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_bytes_that_are_not_utf8_are_named_with_file_and_line(tmp_path):
    """Past the text layer's first chunk too (it decodes ahead, so its own error cannot say where);
    a split file the same way."""
    path = detection_file(tmp_path, "test", "emu")
    path.write_bytes(b"x 0.9 1 1 5 5\n" * 1000 + b"x 0.5 1 1 5 \xe9\n")
    with pytest.raises(DevkitFormatError) as info:
        read_detections(tmp_path, CLASSES, "test", ["x"])
    assert str(info.value) == (
        f"{path}:1001: not UTF-8 text (byte 0xe9 at offset 14012); a result file holds "
        "'<image_id> <score> <xmin> <ymin> <xmax> <ymax>' lines"
    )
    split = tmp_path / "VOC" / "ImageSets" / "Main" / "test.txt"
    split.parent.mkdir(parents=True)
    split.write_bytes(b"\xff\xfe0\x000\x001\x00")  # UTF-16, as some editors save
    with pytest.raises(DevkitFormatError, match=rf"^{split}:1: not UTF-8 text \(byte 0xff at offset 0\); a split"):
        read_image_ids(tmp_path / "VOC", "test")


def test_missing_results_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results directory"):
        read_detections(tmp_path / "nowhere", CLASSES, "test", ["x"])


@pytest.mark.parametrize(("image_id", "label", "message"), [("a b", 1, "one word"), ("a", 0, "1..3"), ("a", 4, "1..3")])
def test_write_rejects_what_the_format_cannot_hold(tmp_path, image_id, label, message):
    dets = dets_of({image_id: [(label, 0.5, 0, 0, 1, 1)]})
    with pytest.raises(ValueError, match=message):
        write_detections(dets, CLASSES, tmp_path, "test")


# --- ground truth ---

XML = """<annotation><size><width>500</width><height>375</height><depth>3</depth></size>{objects}
</annotation>"""
OBJECT = """<object><name>{name}</name>{difficult}<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>
<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>{part}</object>"""
PART = """<part><name>head</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>3</xmax><ymax>3</ymax>
</bndbox></part>"""


def write_voc(root: Path, split: str, images: dict[str, list[tuple]]) -> Path:
    """images: id -> [(name, (xmin, ymin, xmax, ymax), difficult or None for no tag, with_part)]."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    for image_id, objects in images.items():
        body = "".join(
            OBJECT.format(
                name=name,
                b=box,
                difficult="" if diff is None else f"<difficult>{int(diff)}</difficult>",
                part=PART if part else "",
            )
            for name, box, diff, part in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(XML.format(objects=body))
    return root


def test_ground_truth_reads_own_boxes_only_and_defaults_difficult_to_zero(tmp_path):
    root = write_voc(
        tmp_path,
        "test",
        {
            "000002": [
                ("dog", (10, 20, 30, 40), None, True),
                ("cat", (1, 1, 500, 375), True, False),
            ],
            "000001": [],
        },
    )
    gt = read_ground_truth(root, "test", CLASSES)
    assert gt.image_ids == ["000002", "000001"]  # split order, not sorted
    np.testing.assert_array_equal(gt.boxes[0], [[9, 19, 30, 40], [0, 0, 500, 375]])
    assert gt.labels[0].tolist() == [2, 1]
    assert gt.difficult[0].tolist() == [False, True]
    assert gt.boxes[1].shape == (0, 4) and gt.labels[1].shape == (0,)


def test_ground_truth_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC directory"):
        read_ground_truth(tmp_path / "absent", "test", CLASSES)
    root = write_voc(tmp_path, "test", {"1": [("horse", (1, 1, 2, 2), False, False)]})
    with pytest.raises(FileNotFoundError, match="val.txt"):
        read_ground_truth(root, "val", CLASSES)
    with pytest.raises(DevkitFormatError, match=r"1\.xml: class horse.*--classes"):
        read_ground_truth(root, "test", CLASSES)
    (root / "Annotations" / "1.xml").unlink()
    with pytest.raises(FileNotFoundError, match="annotation of image '1'"):
        read_ground_truth(root, "test", CLASSES)


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
    assert [r.getMessage() for r in caplog.records] == [
        f"{empty} holds no comp4_det_val_<class>.txt file: no detections"
    ]


# The 20 classes of PASCAL VOC in the devkit's order (VOCinit.m), written out.
VOC20 = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


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
    xml = write(
        voc / "Annotations" / "1.xml",
        f"<annotation><size><width>10</width><height>10</height></size>{objects}</annotation>",
    )
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
    for name in (
        "comp4_det_test_dog.txt",
        "comp4_det_test_car.txt",
        "comp4_det_val_cat.txt",
        "comp3_det_test_bird.txt",
        "comp4_det_test_.txt",  # no class name at all
        "comp4_det_test_cow.txt.bak",
        "comp4_det_test_horse.csv",
    ):
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
