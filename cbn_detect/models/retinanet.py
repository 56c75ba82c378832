"""RetinaNet from scratch: torchvision's detector with a per-level-norm head.

Anchors, box coding, matching, focal loss and NMS post-processing are torchvision's. What is ours
is the head tower: torchvision shares each head convolution *and its norm* across FPN levels, so a
BatchNorm there mixes statistics of 5 very different feature maps. Here the convolutions stay
shared but each level gets its own norm (statistics, running buffers, CBN history), as detectron2
does for BN heads. Each tower declares which conv produces which norm's input
(``norm_producers``), which is what CBN needs to compensate its history.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

from cbn_detect.models.backbone import resnet_fpn_backbone


class PerLevelNormTower(nn.Module):
    """``num_convs`` x (3x3 conv shared across levels -> norm of that level -> ReLU).

    The caller guarantees that ``norms[i][level]`` is applied right after ``conv[i]`` on the same
    level's features, which is the order ``forward`` uses.
    """

    def __init__(self, channels: int, num_convs: int, num_levels: int) -> None:
        super().__init__()
        self.conv = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False) for _ in range(num_convs)
        )
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels)) for _ in range(num_convs)
        )
        self.relu = nn.ReLU(inplace=True)
        for conv in self.conv:
            nn.init.normal_(conv.weight, std=0.01)

    def norm_producers(self) -> dict[str, nn.Conv2d]:
        return {
            f"norms.{i}.{level}": conv
            for i, conv in enumerate(self.conv)
            for level in range(len(self.norms[i]))
        }

    def forward(self, x: Tensor, level: int) -> Tensor:
        for conv, norms in zip(self.conv, self.norms):
            x = self.relu(norms[level](conv(x)))
        return x


class ClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification head (loss, prior init) over a per-level-norm tower."""

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int,
        num_levels: int,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__(channels, num_anchors, num_classes, prior_probability)
        self.conv = PerLevelNormTower(channels, num_convs, num_levels)

    def forward(self, x: list[Tensor]) -> Tensor:
        outputs = []
        for level, features in enumerate(x):
            logits = self.cls_logits(self.conv(features, level))
            n, _, h, w = logits.shape
            # (N, A*K, H, W) -> (N, HWA, K)
            logits = logits.view(n, -1, self.num_classes, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(logits.reshape(n, -1, self.num_classes))
        return torch.cat(outputs, dim=1)


class RegressionHead(RetinaNetRegressionHead):
    """torchvision's box regression head (L1 loss on encoded boxes) over a per-level-norm tower."""

    def __init__(self, channels: int, num_anchors: int, num_convs: int, num_levels: int) -> None:
        super().__init__(channels, num_anchors)
        self.conv = PerLevelNormTower(channels, num_convs, num_levels)

    def forward(self, x: list[Tensor]) -> Tensor:
        outputs = []
        for level, features in enumerate(x):
            deltas = self.bbox_reg(self.conv(features, level))
            n, _, h, w = deltas.shape
            # (N, A*4, H, W) -> (N, HWA, 4)
            deltas = deltas.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(deltas.reshape(n, -1, 4))
        return torch.cat(outputs, dim=1)


class RetinaNetDetector(RetinaNet):
    """torchvision's RetinaNet, declaring where its layers belong (module-path prefix -> name, the
    longest matching prefix wins): ``norm_regions`` for ``convert_norm(where=...)`` and
    ``parameter_groups`` for the training diagnostics."""

    norm_regions = {"backbone.fpn": "fpn", "backbone": "backbone", "head": "head"}
    parameter_groups = {
        "backbone.body": "backbone.stem",
        **{f"backbone.body.layer{i}": f"backbone.layer{i}" for i in range(1, 5)},
        "backbone.fpn": "backbone.fpn",
        "head.classification_head": "head.classification_head",
        "head.regression_head": "head.regression_head",
    }


def anchor_generator(sizes: Sequence[int], octave_scales: int = 3) -> AnchorGenerator:
    """RetinaNet's anchors: per level ``size * 2^(i/octave_scales)`` at aspect ratios 0.5, 1, 2."""
    per_level = tuple(tuple(s * 2 ** (i / octave_scales) for i in range(octave_scales)) for s in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(sizes))


def build_retinanet(
    num_classes: int,
    depth: str = "resnet50",
    base_width: int = 64,
    fpn_channels: int = 256,
    returned_stages: Sequence[int] = (2, 3, 4),
    extra_levels: str = "p6p7",
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    head_convs: int = 4,
    min_size: int = 800,
    max_size: int = 1333,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    prior_probability: float = 0.01,
) -> RetinaNetDetector:
    """A randomly initialised RetinaNet for ``num_classes`` object classes (labels 1..num_classes).

    torchvision's focal loss indexes its one-hot target by label, so the network predicts
    ``num_classes + 1`` logits and never uses logit 0 (as torchvision's COCO RetinaNet does).
    """
    backbone = resnet_fpn_backbone(depth, base_width, fpn_channels, list(returned_stages), extra_levels)
    num_levels = len(returned_stages) + (2 if extra_levels == "p6p7" else 0)
    if len(anchor_sizes) != num_levels:
        raise ValueError(
            f"model.anchor_sizes has {len(anchor_sizes)} entries but the FPN has {num_levels} levels "
            f"(returned_stages={list(returned_stages)}, extra_levels={extra_levels!r})"
        )
    anchors = anchor_generator(anchor_sizes)
    num_anchors = anchors.num_anchors_per_location()[0]
    head = RetinaNetHead(fpn_channels, num_anchors, num_classes + 1)
    head.classification_head = ClassificationHead(
        fpn_channels, num_anchors, num_classes + 1, head_convs, num_levels, prior_probability
    )
    head.regression_head = RegressionHead(fpn_channels, num_anchors, head_convs, num_levels)
    return RetinaNetDetector(
        backbone,
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
    )
