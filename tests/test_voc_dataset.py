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
from cbn_detect.voc import VOC_CLASSES, DatasetNotFoundError, VOCObject, parse_annotation
from tests.conftest import CONF_DIR
from tests.voc_fixture import STANDARD_SPLITS, write_standard_voc


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
