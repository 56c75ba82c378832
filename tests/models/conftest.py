"""What the model tests share: torchvision's ImageNet normalisation and a small class count."""

from __future__ import annotations

# Written out here, not imported: the values SSD300 and torchvision use.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
NUM_CLASSES = 3
