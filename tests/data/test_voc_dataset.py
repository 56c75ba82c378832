"""VOCDataset and parse_annotation on a fixture with real VOC quirks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchvision import tv_tensors
from torchvision.transforms import v2

from cbn_detect.data.build import build_dataset
from cbn_detect.data.voc import VOCDataset
from cbn_detect.voc import VOC_CLASSES, DatasetNotFoundError, VOCObject, devkit_ground_truth, parse_annotation
from cbn_detect.voc.annotations import Annotation, repair_boxes
from cbn_detect.voc.errors import DatasetError
from tests.conftest import CONF_DIR, write
from tests.helpers.voc_fixture import STANDARD_SPLITS, write_standard_voc


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    return write_standard_voc(tmp_path)


def test_parse_annotation_reads_object_boxes_not_part_boxes(voc: Path) -> None:
    annotation = parse_annotation(voc / "Annotations" / "000001.xml")
    assert annotation.filename == "000001.jpg"
    assert (annotation.width, annotation.height) == (64, 48)
    assert [o.name for o in annotation.objects] == ["person", "dog"]
    assert annotation.objects[0] == VOCObject("person", False, (10.0, 5.0, 40.0, 45.0))


def test_parse_annotation_missing_difficult_means_not_difficult(voc: Path) -> None:
    objects = parse_annotation(voc / "Annotations" / "000002.xml").objects
    assert [o.difficult for o in objects] == [False, True]


def test_parse_annotation_reads_float_coordinates(voc: Path) -> None:
    objects = parse_annotation(voc / "Annotations" / "2012_000004.xml").objects
    assert objects[0].bbox == (10.5, 20.0, 50.5, 55.25)


@pytest.mark.parametrize("split", sorted(STANDARD_SPLITS))
def test_dataset_lists_every_split_id_in_order(voc: Path, split: str) -> None:
    dataset = VOCDataset(voc, split)
    assert dataset.ids == list(STANDARD_SPLITS[split])
    assert len(dataset) == len(STANDARD_SPLITS[split])
    assert [dataset[i][1]["image_id"] for i in range(len(dataset))] == dataset.ids


def test_item_holds_image_and_continuous_xyxy_target(voc: Path) -> None:
    image, target = VOCDataset(voc, "trainval")[0]
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 48, 64)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(boxes.canvas_size) == (48, 64) and boxes.dtype == torch.float32
    # VOC (10, 5, 40, 45) and (41, 20, 64, 48), 1-based inclusive -> (x - 1, y - 1, x, y).
    assert boxes.tolist() == [[9, 4, 40, 45], [40, 19, 64, 48]]
    person, dog = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("dog") + 1
    assert target["labels"].tolist() == [person, dog] and target["labels"].dtype == torch.int64
    assert target["difficult"].tolist() == [False, False]
    assert target["image_id"] == "000001" and target["orig_size"] == (48, 64)


def test_item_reads_float_coordinates_and_image_size(voc: Path) -> None:
    _, target = VOCDataset(voc, "test")[0]
    assert target["boxes"].tolist() == [[9.5, 19.0, 50.5, 55.25]]
    assert target["orig_size"] == (60, 80)


def test_keep_difficult_switches_difficult_objects(voc: Path) -> None:
    kept = VOCDataset(voc, "trainval")
    dropped = VOCDataset(voc, "trainval", keep_difficult=False)
    assert kept[1][1]["difficult"].tolist() == [False, True]
    assert dropped[1][1]["difficult"].tolist() == [False]
    assert dropped[1][1]["labels"].tolist() == [VOC_CLASSES.index("car") + 1]
    # An image with only difficult objects stays, with no boxes.
    assert kept[2][1]["boxes"].shape == (1, 4)
    assert dropped.ids == kept.ids and dropped[2][1]["boxes"].shape == (0, 4)


def test_image_without_objects_is_kept_as_negative(voc: Path) -> None:
    dataset = VOCDataset(voc, "test")
    _, target = dataset[1]
    assert target["image_id"] == "000005"
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert dataset.problems.num_negatives == 1 and not dataset.problems


def test_ground_truth_needs_no_images_and_keeps_difficult(voc: Path) -> None:
    dataset = VOCDataset(voc, "trainval", keep_difficult=False)
    for image in (voc / "JPEGImages").iterdir():
        image.unlink()
    truth = dataset.ground_truth()
    assert truth.image_ids == list(STANDARD_SPLITS["trainval"])
    assert truth.boxes[1].dtype == np.float64
    np.testing.assert_array_equal(truth.boxes[1], [[0, 0, 30, 20], [29, 19, 50, 40]])
    assert truth.labels[1].dtype == np.int64 and truth.difficult[1].tolist() == [False, True]


def test_root_may_be_vocdevkit_plus_year(voc: Path) -> None:
    dataset = VOCDataset(voc.parent, "trainval", year=2007)
    assert dataset.root == voc and len(dataset) == 3


def voc_data_cfg(name: str, root: Path):
    """The data config of ``data=<name> data.root=<root>``, as a run composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"data={name}", f"data.root={root}"]).data


def test_data_root_may_be_the_voc2007_folder_itself(voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    """voc07: the VOCdevkit folder or its VOC2007 folder, logged once; voc0712 given VOC2007 reads
    VOC2012 from beside it, not VOC2007 a second time."""
    caplog.set_level(logging.INFO, logger="cbn_detect.data.voc")
    assert build_dataset(voc_data_cfg("voc07", voc), train=False).root == voc
    assert build_dataset(voc_data_cfg("voc07", voc.parent), train=True).root == voc
    assert [r.getMessage() for r in caplog.records] == [f"reading VOC data from {voc}"]
    shutil.copytree(voc, voc.parent / "VOC2012")
    both = build_dataset(voc_data_cfg("voc0712", voc), train=True)
    assert [part.root for part in both.datasets] == [voc, voc.parent / "VOC2012"]


def test_data_root_of_another_year_without_the_year_beside_it_names_the_setting(voc: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(voc_data_cfg("voc0712", voc), train=True)
    assert str(info.value) == (
        f"data.root={voc} is the VOC2007 folder, but VOC2012 is needed too and {voc.parent / 'VOC2012'} is no "
        "VOC folder: set data.root to the VOCdevkit folder that holds VOC2007/ and VOC2012/"
    )


def test_custom_classes_number_labels_from_one(voc: Path) -> None:
    classes = ("dog", "person", "car", "chair", "bottle", "cat")
    _, target = VOCDataset(voc, "trainval", classes=classes)[0]
    assert target["labels"].tolist() == [2, 1]


def test_transforms_move_boxes_with_pixels(voc: Path) -> None:
    plain_image, plain = VOCDataset(voc, "trainval")[0]
    flip = v2.RandomHorizontalFlip(p=1.0)
    image, target = VOCDataset(voc, "trainval", transforms=flip)[0]
    assert torch.equal(image, plain_image.flip(-1))
    assert target["boxes"].tolist() == [[24, 4, 55, 45], [0, 19, 24, 48]]
    assert target["labels"].tolist() == plain["labels"].tolist()


def test_problems_of_a_clean_split_serialise_to_json(voc: Path) -> None:
    problems = VOCDataset(voc, "test").problems
    assert json.loads(json.dumps(problems.to_dict())) == {
        "split": "VOC2007/test",
        "num_images": 3,
        "num_excluded": 0,
        "num_negatives": 1,
        "counts": {},
        "examples": {},
    }


def test_cached_images_are_the_decoded_ones_read_once_and_never_changed(voc: Path) -> None:
    """``cache_images``: the same pixels as decoding; the file is read once (deleting it after the
    first read changes nothing), and what a transform does to a returned image stays out of the cache."""
    expected = VOCDataset(voc, "trainval")[0][0]
    cached = VOCDataset(voc, "trainval", cache_images=True)
    first, _ = cached[0]
    assert isinstance(first, tv_tensors.Image) and torch.equal(first, expected)
    first.zero_()  # as an in-place transform would
    cached._records[0].image_path.unlink()
    again, _ = cached[0]
    assert torch.equal(again, expected)
    with pytest.raises(Exception, match="image missing"):
        VOCDataset(voc, "trainval", on_error="raise")  # without the cache the file is gone


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
        "<folder>VOC2012</folder><filename>2008_000001.jpg</filename>"
        + SIZE
        + "<object><name>person</name><pose>Left</pose><truncated>1</truncated>"
        "<part><name>head</name>" + box(300, 20, 340, 60) + "</part>"
        "<part><name>hand</name>" + box(280, 100, 290, 110) + "</part>" + box(273.5, 12, 400, 375) + "</object>"
        "<object><name>\n\t\tdog </name><truncated>1</truncated><difficult>1</difficult>"
        + box(1, 1, 50, 40)
        + "</object>",
        name="other_stem.xml",
    )
    assert parse_annotation(path) == Annotation(
        filename="2008_000001.jpg",
        width=500,
        height=375,
        objects=(
            VOCObject("person", False, (273.5, 12.0, 400.0, 375.0)),
            VOCObject("dog", True, (1.0, 1.0, 50.0, 40.0)),
        ),
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
        (
            SIZE + "<object><name>dog</name><bndbox><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
            "<bndbox> has no <xmin>",
        ),
        (
            SIZE + "<object><name>dog</name><difficult>2</difficult>" + box(1, 1, 5, 5) + "</object>",
            "object 'dog': <difficult> must be 0 or 1, got '2'",
        ),
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
