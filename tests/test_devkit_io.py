"""Devkit-format result files (exact round trip, errors naming file and line) and ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbn_detect.bench.eval import synthetic_problem
from cbn_detect.evaluation.devkit_io import (
    DevkitFormatError,
    detection_file,
    read_detections,
    read_ground_truth,
    read_image_ids,
    write_detections,
)
from cbn_detect.evaluation.voc_ap import evaluate_voc
from cbn_detect.voc import Detections, xyxy_to_voc

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


@pytest.mark.parametrize(
    ("image_id", "label", "message"), [("a b", 1, "one word"), ("a", 0, "1..3"), ("a", 4, "1..3")]
)
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
