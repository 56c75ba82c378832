"""Per-image transforms with torchvision.transforms.v2, which moves boxes along with the pixels.

Resizing to the network's input size is left to the detector's own ``GeneralizedRCNNTransform``
(keep-ratio, ``model.min_size`` / ``model.max_size``), which also maps detections back to the
original image, so evaluation always happens in the annotation's own coordinates.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def train_transforms(hflip: float) -> v2.Compose:
    steps: list[v2.Transform] = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def test_transforms() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
