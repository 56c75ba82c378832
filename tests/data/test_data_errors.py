"""Bad input (issue 7): every case raises naming the file under "raise", is counted under "skip"."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from cbn_detect.data.voc import VOCDataset
from cbn_detect.voc import DatasetError, DatasetNotFoundError
from tests.helpers.voc_fixture import FixtureImage, FixtureObject, annotation_xml, write_standard_voc

# The standard fixture's trainval split: 000001, 000002, 000003. Each breaker damages 000002 and
# returns the file the error must name.
Breaker = Callable[[Path], Path]


def _corrupt_jpeg(voc: Path) -> Path:
    path = voc / "JPEGImages" / "000002.jpg"
    path.write_bytes(b"this is not a JPEG at all")
    return path


def _malformed_xml(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    path.write_text(path.read_text().replace("</name>", "</nmae>", 1))
    return path


def _truncated_xml(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    return path


def _missing_image(voc: Path) -> Path:
    path = voc / "JPEGImages" / "000002.jpg"
    path.unlink()
    return path


def _missing_annotation(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    path.unlink()
    return path


def _unknown_class(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    path.write_text(path.read_text().replace("<name>car</name>", "<name>unicorn</name>"))
    return path


def _non_numeric_coordinate(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    path.write_text(path.read_text().replace("<xmax>30</xmax>", "<xmax>thirty</xmax>"))
    return path


def _infinite_size(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    path.write_text(path.read_text().replace("<width>64</width>", "<width>inf</width>"))
    return path


def _size_mismatch(voc: Path) -> Path:
    path = voc / "Annotations" / "000002.xml"
    path.write_text(path.read_text().replace("<width>64</width>", "<width>65</width>"))
    return voc / "JPEGImages" / "000002.jpg"


BREAKERS = {
    "corrupt_image": _corrupt_jpeg,
    "malformed_annotation": _malformed_xml,
    "truncated_annotation": _truncated_xml,
    "missing_image": _missing_image,
    "missing_annotation": _missing_annotation,
    "unknown_class": _unknown_class,
    "non_numeric_coordinate": _non_numeric_coordinate,
    "infinite_size": _infinite_size,
    "size_mismatch": _size_mismatch,
}
KINDS = {
    "truncated_annotation": "malformed_annotation",
    "non_numeric_coordinate": "malformed_annotation",
    "infinite_size": "malformed_annotation",
}


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    return write_standard_voc(tmp_path)


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_image_raises_naming_the_file(voc: Path, case: str) -> None:
    bad_file = BREAKERS[case](voc)
    with pytest.raises(DatasetError, match=re.escape(str(bad_file))):
        VOCDataset(voc, "trainval")


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_image_is_skipped_and_counted(voc: Path, case: str) -> None:
    bad_file = BREAKERS[case](voc)
    dataset = VOCDataset(voc, "trainval", on_error="skip")
    assert dataset.ids == ["000001", "000003"]
    kind = KINDS.get(case, case)
    summary = dataset.problems.to_dict()
    assert summary["counts"] == {kind: 1} and summary["num_excluded"] == 1
    assert str(bad_file) in summary["examples"][kind][0]
    json.dumps(summary)


@pytest.mark.parametrize("breaker", [_malformed_xml, _truncated_xml])
def test_xml_error_names_the_parser_line(voc: Path, breaker: Breaker) -> None:
    bad_file = breaker(voc)
    where = re.escape(str(bad_file))
    with pytest.raises(DatasetError, match=rf"{where}:\d+:\d+: malformed annotation XML"):
        VOCDataset(voc, "trainval")


def test_unknown_class_error_lists_the_known_classes(voc: Path) -> None:
    _unknown_class(voc)
    known = "known classes: aeroplane, bicycle, .*, tvmonitor$"
    with pytest.raises(DatasetError, match=f"'unicorn'; {known}"):
        VOCDataset(voc, "trainval")


def _truncate_jpeg(voc: Path) -> Path:
    path = voc / "JPEGImages" / "000002.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_truncated_jpeg_fails_when_decoded(voc: Path, on_error: str) -> None:
    bad_file = _truncate_jpeg(voc)
    dataset = VOCDataset(voc, "trainval", on_error=on_error)  # the header check cannot see it
    dataset[0]
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad_file))}: corrupt image"):
        dataset[1]


def test_truncated_jpeg_is_skipped_under_full_verification(voc: Path) -> None:
    bad_file = _truncate_jpeg(voc)
    dataset = VOCDataset(voc, "trainval", on_error="skip", verify_images="full")
    assert dataset.ids == ["000001", "000003"]
    assert dataset.problems.counts == {"corrupt_image": 1}
    assert str(bad_file) in dataset.problems.places["corrupt_image"][0]
    with pytest.raises(DatasetError, match=re.escape(str(bad_file))):
        VOCDataset(voc, "trainval", verify_images="full")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_split_file_raises_in_both_modes(voc: Path, on_error: str, content: str) -> None:
    path = voc / "ImageSets" / "Main" / "trainval.txt"
    path.write_text(content)
    where = re.escape(str(path))
    with pytest.raises(DatasetError, match=rf"{where}: split file lists no image ids"):
        VOCDataset(voc, "trainval", on_error=on_error)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_missing_split_file_raises_listing_the_splits(voc: Path, on_error: str) -> None:
    path = voc / "ImageSets" / "Main" / "val.txt"
    expected = f"{path}: split file not found; splits here: ['test', 'trainval']"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        VOCDataset(voc, "val", on_error=on_error)


def test_bad_split_lines_name_their_line_number(voc: Path) -> None:
    path = voc / "ImageSets" / "Main" / "trainval.txt"
    path.write_text("000001\n000002\n000003 1\n000001\n")
    where = re.escape(str(path))
    with pytest.raises(DatasetError, match=rf"{where}:3: expected one image id per line"):
        VOCDataset(voc, "trainval")
    dataset = VOCDataset(voc, "trainval", on_error="skip")
    assert dataset.ids == ["000001", "000002"]
    assert dataset.problems.counts == {"bad_split_line": 2}
    assert dataset.problems.places["bad_split_line"][1].startswith(f"{path}:4: duplicate of line 1")


def _write_boxes(voc: Path, *boxes: tuple[float, float, float, float]) -> None:
    image = FixtureImage("000002", objects=[FixtureObject("car", box) for box in boxes])
    (voc / "Annotations" / "000002.xml").write_text(annotation_xml(image))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_boxes_outside_the_image_are_clipped_and_counted(voc: Path, on_error: str) -> None:
    # The image is 64 x 48; (1, 1, 64, 48) is exactly the whole image and needs no clipping.
    _write_boxes(voc, (-5, 1, 70, 30), (10, 40, 20, 60), (1, 1, 64, 48))
    dataset = VOCDataset(voc, "trainval", on_error=on_error)
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[0, 0, 64, 30], [9, 39, 20, 48], [0, 0, 64, 48]]
    assert dataset.problems.counts == {"box_clipped": 2} and dataset.problems.num_excluded == 0


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_boxes_without_area_are_dropped_and_counted(voc: Path, on_error: str) -> None:
    # xmax = xmin - 1 is zero width in VOC's inclusive convention; (80, ...) lies outside.
    _write_boxes(voc, (10, 10, 9, 20), (30, 30, 20, 40), (5, 5, 20, 20), (80, 10, 90, 20))
    dataset = VOCDataset(voc, "trainval", on_error=on_error)
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[4, 4, 20, 20]] and len(target["labels"]) == 1
    assert dataset.problems.counts == {"box_dropped": 3}
    assert "000002.xml (object 1, car" in dataset.problems.places["box_dropped"][0]


def test_skipped_problems_are_logged_once(voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    _corrupt_jpeg(voc)
    _missing_annotation(voc)  # the same image: counted once, under its first problem
    with caplog.at_level(logging.WARNING, logger="cbn_detect.data.voc"):
        dataset = VOCDataset(voc, "trainval", on_error="skip")
    assert dataset.problems.counts == {"missing_annotation": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "missing_annotation: 1" in warnings[0].getMessage()


def test_split_with_no_usable_image_raises(voc: Path) -> None:
    for xml in (voc / "Annotations").iterdir():
        xml.write_text("<annotation>")
    with pytest.raises(DatasetError, match="no usable image in split 'trainval'"):
        VOCDataset(voc, "trainval", on_error="skip")


def test_missing_root_says_where_voc_goes(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "VOCdevkit"
    with pytest.raises(DatasetNotFoundError) as info:
        VOCDataset(missing, "trainval", year="2007")
    message = str(info.value)
    assert str(missing / "VOC2007") in message and "(no such folder)" in message
    assert "data.root" in message and "VOCdevkit folder that holds VOC2007/" in message
    assert "data=synthetic" in message


def test_partial_layout_is_not_found(tmp_path: Path) -> None:
    voc = write_standard_voc(tmp_path)
    for image in (voc / "JPEGImages").iterdir():
        image.unlink()
    (voc / "JPEGImages").rmdir()
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(voc))):
        VOCDataset(voc, "trainval")
