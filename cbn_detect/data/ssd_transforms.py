"""SSD's training augmentation (Liu et al. 2016, Sec. 2.2) with torchvision.transforms.v2.

Photometric distortion, zoom-out onto a mean-coloured canvas up to 4x ("expand"), a random crop
that keeps a minimum IoU with some object, a horizontal flip, then a resize to the network's input
size. SSD from scratch leans on this much more than RetinaNet does: the zoom-out and crop are what
give it small and large objects on its few fixed-size maps.

There is no SSD-specific test pipeline: ``cbn_detect.data.transforms.test_transforms`` is right as
it is. ``torchvision``'s SSD resizes every input to ``size`` x ``size`` itself and maps detections
back, so evaluation stays in the annotation's own frame only if test images are *not* resized here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2


def labels_and_difficult(sample: tuple[Any, dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``SanitizeBoundingBoxes`` filters along with the boxes.

    Its default finds only ``labels``; a dropped box would then leave ``difficult`` one entry
    longer than ``boxes`` and misaligned with it.
    """
    target = sample[1]
    return target["labels"], target["difficult"]


def ssd_train_transforms(size: int, hflip: float, fill: Sequence[float]) -> v2.Compose:
    """``(uint8 Image, target) -> (float32 Image in [0, 1] of size x size, target)``.

    ``fill`` is the zoom-out canvas colour in [0, 1], the model's ``image_mean`` so that the canvas
    normalises to zero. Resizing here, right after the crop, keeps the batches small; the model's
    own resize to the same size is then a no-op. ``target["orig_size"]`` keeps describing the
    image as loaded.
    """
    steps: list[v2.Transform] = [
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=[round(255 * c) for c in fill], side_range=(1.0, 4.0), p=0.5),
        v2.RandomIoUCrop(),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    steps += [
        v2.Resize((size, size), antialias=True),
        # RandomIoUCrop zeroes the boxes whose centre it cut off; drop them (and tiny ones).
        v2.SanitizeBoundingBoxes(labels_getter=labels_and_difficult),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)
