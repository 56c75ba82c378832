"""SSD from scratch: torchvision's detector on a norm-everywhere trunk, extra layers and head.

Default boxes (``DefaultBoxGenerator``), matching, hard negative mining (3 negatives per positive),
the multibox loss, resizing to ``size`` x ``size`` and post-processing are torchvision's ``SSD``.
What is ours is where the norms sit, following ScratchDet (Zhu et al. 2019), which found that
training SSD from scratch needs BatchNorm in the backbone *and* the head:

- trunk (VGG16 or a ResNet) and the extra layers: a norm after every conv. The extras live inside
  ``model.backbone`` (as in torchvision's ``SSDFeatureExtractorVGG``), so ``norm.where`` counts
  them as "backbone";
- head: ScratchDet's BN on each predictor's output (``output_norm``) and, optionally, a
  conv-norm-ReLU tower before each predictor (``head_convs``). torchvision's SSD head has no norm
  at all; with ``output_norm`` and the norm ``none`` the predictor gets its bias back and the head
  is exactly torchvision's.

Every norm is built as ``nn.BatchNorm2d`` right after its conv in an ``nn.Sequential``; the
composition root swaps them with ``cbn_detect.norm.convert_norm``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead, SSDScoringHead

from cbn_detect.models.backbone import ResNetTrunk
from cbn_detect.models.vgg import conv_bn_relu
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.phases import timed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ExtraLayer:
    """One SSD extra block: 1x1 conv down to ``mid`` channels, then a ``kernel`` conv to ``out``."""

    mid: int
    out: int
    kernel: int = 3
    stride: int = 2
    padding: int = 1

    def build(self, in_channels: int) -> nn.Sequential:
        return nn.Sequential(
            *conv_bn_relu(in_channels, self.mid, 1),
            *conv_bn_relu(self.mid, self.out, self.kernel, self.stride, self.padding),
        )


class ResNetFeatureMaps(nn.Module):
    """A from-scratch ResNet trunk returning the outputs of ``returned_stages`` (2 = C3 ... 4 = C5).

    Stages 2-4 at 300 px give 38, 19 and 10 px maps, the sizes of SSD300's first three maps, so a
    ResNet SSD uses VGG-SSD's default boxes with one extra layer fewer. Stages after the last
    returned one are dropped rather than computed and left without gradient.
    """

    def __init__(
        self, depth: str = "resnet50", base_width: int = 64, returned_stages: Sequence[int] = (2, 3, 4)
    ) -> None:
        super().__init__()
        stages = list(returned_stages)
        if not stages or stages != sorted(set(stages)) or stages[0] < 1 or stages[-1] > 4:
            raise ConfigError(f"model.trunk.returned_stages={stages} must be increasing stage numbers in 1..4")
        trunk = ResNetTrunk(depth, base_width)
        self.body = IntermediateLayerGetter(trunk, {f"layer{s}": str(s) for s in stages})
        self.out_channels = [trunk.stage_channels[s - 1] for s in stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x).values())


class SSDFeatures(nn.Module):
    """The trunk's maps followed by the maps of the extra layers, each computed from the previous."""

    def __init__(self, trunk: nn.Module, extras: Sequence[ExtraLayer]) -> None:
        super().__init__()
        self.trunk = trunk
        channels = list(trunk.out_channels)
        self.extras = nn.ModuleList()
        for extra in extras:
            self.extras.append(extra.build(channels[-1]))
            channels.append(extra.out)
        self.out_channels = channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.trunk(x)
        for extra in self.extras:
            maps.append(extra(maps[-1]))
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class SSDDetector(SSD):
    """torchvision's SSD, declaring where its layers belong (module-path prefix -> name, the longest
    matching prefix wins): ``norm_regions`` for ``convert_norm(where=...)`` (the extra layers are
    part of the backbone; SSD has no FPN) and ``parameter_groups`` for the training diagnostics."""

    norm_regions = {"backbone": "backbone", "head": "head"}
    parameter_groups = {
        "backbone.trunk": "backbone.trunk",
        "backbone.extras": "backbone.extras",
        "head.classification_head": "head.classification_head",
        "head.regression_head": "head.regression_head",
    }

    @timed("loss")
    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """torchvision's losses, marked as the phase ``loss`` of a profile (torchvision's forward
        matches the boxes before this, so for SSD matching counts as forward)."""
        return super().compute_loss(targets, head_outputs, anchors, matched_idxs)


def predictor(in_channels: int, out_channels: int, head_convs: int, output_norm: bool) -> nn.Sequential:
    """``head_convs`` x (3x3 conv -> norm -> ReLU), the 3x3 predictor conv, then optionally its norm."""
    layers: list[nn.Module] = []
    for _ in range(head_convs):
        layers += conv_bn_relu(in_channels, in_channels, 3, padding=1)
    out = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not output_norm)
    # torchvision's SSD initialisation of the predictors.
    nn.init.xavier_uniform_(out.weight)
    if out.bias is not None:
        nn.init.zeros_(out.bias)
    layers.append(out)
    if output_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


def ssd_head(
    in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int, head_convs: int, output_norm: bool
) -> SSDHead:
    """torchvision's ``SSDHead`` (per-map, unshared predictors) with our per-map predictor blocks."""
    head = SSDHead(list(in_channels), list(num_anchors), num_classes)
    head.classification_head = SSDScoringHead(
        nn.ModuleList(predictor(c, a * num_classes, head_convs, output_norm) for c, a in zip(in_channels, num_anchors)),
        num_classes,
    )
    head.regression_head = SSDScoringHead(
        nn.ModuleList(predictor(c, a * 4, head_convs, output_norm) for c, a in zip(in_channels, num_anchors)),
        4,
    )
    return head


def build_ssd(
    num_classes: int,
    trunk: nn.Module,
    extras: Sequence[Mapping[str, int]],
    size: int = 300,
    aspect_ratios: Sequence[Sequence[int]] = ([2], [2, 3], [2, 3], [2, 3], [2], [2]),
    scales: Sequence[float] | None = (0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05),
    steps: Sequence[int] | None = (8, 16, 32, 64, 100, 300),
    head_convs: int = 0,
    output_norm: bool = True,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    detections_per_img: int = 200,
    topk_candidates: int = 400,
    iou_thresh: float = 0.5,
    positive_fraction: float = 0.25,
) -> SSDDetector:
    """A randomly initialised SSD for ``num_classes`` object classes (labels 1..num_classes).

    ``trunk`` returns a list of feature maps and has ``out_channels`` (``VGG16Trunk``,
    ``ResNetFeatureMaps``); ``extras`` are ``ExtraLayer`` fields. The defaults are SSD300 on VOC
    (Liu et al. 2016): 6 maps, default-box scales 0.1 then 0.2..0.88 (the 8,732 default boxes of
    VGG16 SSD300). ``steps=None`` places box centres from the map sizes alone, which keeps a model
    valid when ``size`` is overridden. SSD's softmax reserves class 0 for background, so the
    network predicts ``num_classes + 1`` scores. Inputs are normalised with ``image_mean`` /
    ``image_std`` after torchvision's resize; detections come back in the input image's frame.
    """
    features = SSDFeatures(trunk, [ExtraLayer(**dict(e)) for e in extras])
    ratios = [[int(r) for r in per_map] for per_map in aspect_ratios]
    num_maps = len(features.out_channels)
    if len(ratios) != num_maps:
        raise ConfigError(
            f"model.aspect_ratios has {len(ratios)} entries but the trunk and extras give {num_maps} "
            f"feature maps ({len(trunk.out_channels)} trunk + {len(extras)} extra)"
        )
    if scales is not None and len(scales) != num_maps + 1:
        raise ConfigError(f"model.scales needs {num_maps + 1} entries (one per map plus the last), got {len(scales)}")
    if steps is not None and len(steps) != num_maps:
        raise ConfigError(f"model.steps needs {num_maps} entries (one per map), got {len(steps)}")
    anchors = DefaultBoxGenerator(
        ratios,
        scales=None if scales is None else [float(s) for s in scales],
        steps=None if steps is None else [int(s) for s in steps],
    )
    head = ssd_head(features.out_channels, anchors.num_anchors_per_location(), num_classes + 1, head_convs, output_norm)
    return SSDDetector(
        features,
        anchors,
        (size, size),
        num_classes + 1,
        image_mean=[float(m) for m in image_mean],
        image_std=[float(s) for s in image_std],
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        iou_thresh=iou_thresh,
        topk_candidates=topk_candidates,
        positive_fraction=positive_fraction,
    )
