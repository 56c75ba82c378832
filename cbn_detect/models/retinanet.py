"""RetinaNet from scratch: torchvision's detector with a per-level-norm head.

Anchors and box coding are torchvision's; matching, the focal and box losses and the NMS
post-processing follow torchvision's rules but run batch-wide (``retinanet_batched``: the same
numbers without a Python loop over images). What is ours in the network is the head tower:
torchvision shares each head convolution *and its norm* across FPN levels, so a BatchNorm there
mixes statistics of 5 very different feature maps. Here the convolutions stay shared but each
level gets its own norm (statistics, running buffers, CBN history), as detectron2 does for BN
heads. Each tower declares which conv produces which norm's input
(``norm_producers``), which is what CBN needs to compensate its history.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

from cbn_detect.models import retinanet_batched as batched
from cbn_detect.models.backbone import resnet_fpn_backbone
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.phases import timed


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
        return {f"norms.{i}.{level}": conv for i, conv in enumerate(self.conv) for level in range(len(self.norms[i]))}

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
    """torchvision's RetinaNet with batch-wide anchor matching, losses and post-processing.

    ``compute_loss`` and ``postprocess_detections`` keep torchvision's signatures and results
    (losses to float rounding, detections identical) but work on the whole batch at once; see
    ``retinanet_batched``. A matcher, head or box loss other than torchvision's own falls back
    to torchvision's per-image code, whose rules the batched path could not know.

    The class also declares where its layers belong (module-path prefix -> name, the longest
    matching prefix wins): ``norm_regions`` for ``convert_norm(where=...)`` and
    ``parameter_groups`` for the training diagnostics.
    """

    norm_regions = {"backbone.fpn": "fpn", "backbone": "backbone", "head": "head"}
    parameter_groups = {
        "backbone.body": "backbone.stem",
        **{f"backbone.body.layer{i}": f"backbone.layer{i}" for i in range(1, 5)},
        "backbone.fpn": "backbone.fpn",
        "head.classification_head": "head.classification_head",
        "head.regression_head": "head.regression_head",
    }

    def _batched_loss_applies(self) -> bool:
        cls_head, reg_head = self.head.classification_head, self.head.regression_head
        return (
            type(self.proposal_matcher) is Matcher
            and type(self.head).compute_loss is RetinaNetHead.compute_loss
            and type(cls_head).compute_loss is RetinaNetClassificationHead.compute_loss
            and type(reg_head).compute_loss is RetinaNetRegressionHead.compute_loss
            and reg_head._loss_type in ("l1", "smooth_l1")
        )

    @timed("loss")
    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        """torchvision's losses: the focal loss and the box loss, each summed per image, divided by
        that image's foreground anchors and averaged over images. Anchor matching included, it is the
        phase ``loss`` of a profile (inside the training forward, which alone cannot tell them apart)."""
        if not self._batched_loss_applies():
            return super().compute_loss(targets, head_outputs, anchors)
        cls_logits, bbox_regression = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        anchors_t = torch.stack(anchors)  # (N, A, 4)
        gt_boxes, gt_labels, gt_valid = batched.pad_targets(targets, anchors_t.device)
        matcher = self.proposal_matcher
        matched = batched.assign(
            gt_boxes,
            gt_valid,
            anchors_t,
            matcher.high_threshold,
            matcher.low_threshold,
            matcher.allow_low_quality_matches,
        )
        cls_head, reg_head = self.head.classification_head, self.head.regression_head
        return {
            "classification": batched.classification_loss(cls_logits, gt_labels, matched, cls_head.BETWEEN_THRESHOLDS),
            "bbox_regression": batched.regression_loss(
                bbox_regression, anchors_t, gt_boxes, matched, reg_head.box_coder, reg_head._loss_type
            ),
        }

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """torchvision's detections (score threshold, per-level top-k, decoding, clipping,
        class-aware NMS, ``detections_per_img``), computed for the batch at once."""

        def torchvision_on(i: int) -> dict[str, Tensor]:
            one = {key: [level[i : i + 1] for level in value] for key, value in head_outputs.items()}
            return super(RetinaNetDetector, self).postprocess_detections(one, [anchors[i]], [image_shapes[i]])[0]

        return batched.postprocess(
            head_outputs["cls_logits"],
            head_outputs["bbox_regression"],
            anchors,
            image_shapes,
            self.box_coder,
            self.score_thresh,
            self.topk_candidates,
            self.nms_thresh,
            self.detections_per_img,
            torchvision_on,
        )


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
    min_size: int = 600,
    max_size: int = 1000,
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
        raise ConfigError(
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
