"""SSD's training augmentation: output format, boxes kept inside the image and in step with labels."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from cbn_detect.data.ssd_transforms import ssd_train_transforms

MEAN = (0.485, 0.456, 0.406)


def sample(boxes: list[list[float]], labels: list[int], difficult: list[bool]) -> tuple[tv_tensors.Image, dict]:
    image = tv_tensors.Image(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(60, 80)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "image_id": "000001",
        "orig_size": (60, 80),
    }
    return image, target


@pytest.mark.parametrize("seed", range(6))
def test_output_is_a_float_square_image_with_valid_boxes_in_step_with_labels(seed: int) -> None:
    torch.manual_seed(seed)
    transform = ssd_train_transforms(size=32, hflip=0.5, fill=MEAN)
    # Label 2 is the only difficult object, so any misalignment after filtering shows.
    boxes = [[2, 3, 30, 40], [40, 10, 78, 58], [10, 30, 20, 45]]
    image, target = transform(*sample(boxes, [1, 2, 3], [False, True, False]))
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert 0.0 <= image.min() and image.max() <= 1.0
    boxes = target["boxes"]
    assert boxes.canvas_size == (32, 32)
    assert len(boxes) == len(target["labels"]) == len(target["difficult"]) >= 1
    assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 32
    assert torch.equal(target["difficult"], target["labels"] == 2)
    assert target["image_id"] == "000001" and target["orig_size"] == (60, 80)


def test_an_image_without_objects_still_gives_a_training_sample() -> None:
    torch.manual_seed(0)
    image, target = ssd_train_transforms(size=32, hflip=0.5, fill=MEAN)(*sample([], [], []))
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["difficult"].shape == (0,)
