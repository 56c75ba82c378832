"""Randomly initialised ResNet trunks with an FPN on top, built from torchvision's pieces.

Every norm layer is built as ``nn.BatchNorm2d``; the composition root swaps them for the configured
norm afterwards with ``cbn_detect.norm.convert_norm``, so the model code never depends on the norm.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from cbn_detect.runtime.errors import ConfigError

_BLOCKS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (resnet.Bottleneck, [3, 4, 23, 3]),
}


class ResNetTrunk(nn.Module):
    """A torchvision-compatible ResNet without the classifier, with a configurable base width.

    torchvision's ``ResNet`` hard-codes 64 stem channels, and CPU smoke runs need far narrower
    networks, so the stem and stages are assembled here from torchvision's own ``BasicBlock`` /
    ``Bottleneck``. Child names (``conv1``, ``bn1``, ``layer1``..``layer4``) and the weight
    initialisation match torchvision's, so ``base_width=64`` gives exactly torchvision's trunk.
    """

    def __init__(self, depth: str = "resnet50", base_width: int = 64) -> None:
        super().__init__()
        if depth not in _BLOCKS:
            raise ConfigError(f"model.depth={depth!r} is not one of {sorted(_BLOCKS)}")
        block, layers = _BLOCKS[depth]
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.stage_channels = [base_width * m * block.expansion for m in (1, 2, 4, 8)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # Bottleneck's own base_width stays 64, so its inner width equals ``planes`` as in torchvision.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)


def resnet_fpn_backbone(
    depth: str,
    base_width: int,
    fpn_channels: int,
    returned_stages: list[int],
    extra_levels: str,
) -> BackboneWithFPN:
    """ResNet stages ``returned_stages`` (2 = C3 ... 4 = C5) -> FPN with BN after every conv.

    ``extra_levels="p6p7"`` adds RetinaNet's P6/P7 (from P5, as torchvision's v1 RetinaNet);
    ``"none"`` keeps only the returned stages, which suits small inputs where P6/P7 would be 1-2 px.
    """
    trunk = ResNetTrunk(depth, base_width)
    if not returned_stages or min(returned_stages) < 1 or max(returned_stages) > 4:
        raise ConfigError(f"model.returned_stages={returned_stages} must be stage numbers in 1..4")
    return_layers = {f"layer{s}": str(i) for i, s in enumerate(returned_stages)}
    in_channels = [trunk.stage_channels[s - 1] for s in returned_stages]
    extra: ExtraFPNBlock | None
    if extra_levels == "p6p7":
        extra = LastLevelP6P7(fpn_channels, fpn_channels)
    elif extra_levels == "none":
        extra = None
    else:
        raise ConfigError(f"model.extra_levels={extra_levels!r} must be 'p6p7' or 'none'")
    backbone = BackboneWithFPN(
        trunk, return_layers, in_channels, fpn_channels, extra_blocks=extra, norm_layer=nn.BatchNorm2d
    )
    if extra is None:
        # BackboneWithFPN silently substitutes a max-pool level for a missing extra block.
        backbone.fpn.extra_blocks = None
    return backbone
