"""VGG16 for SSD, randomly initialised, with a norm after every convolution.

torchvision's ``SSDFeatureExtractorVGG`` is not reused: it finds the pools of a VGG by position and
does accept ``vgg16_bn().features``, but it appends fc6/fc7 and the extra layers *without* norms and
with biases, and ``vgg16_bn`` gives its convs biases that the following BN makes redundant. Here
every conv is ``Conv2d(bias=False) -> BatchNorm2d -> ReLU``, consecutive in an ``nn.Sequential``,
which is the layout ``convert_norm`` needs to find each norm's producing conv (and to give the conv
its bias back when the norm is ``none``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> list[nn.Module]:
    """Conv (no bias: the norm's shift replaces it) -> BatchNorm -> ReLU, He-initialised for the ReLU."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _convs(in_channels: int, out_channels: int, count: int) -> list[nn.Module]:
    """One VGG stage: ``count`` padded 3x3 convs."""
    layers = conv_bn_relu(in_channels, out_channels, 3, padding=1)
    for _ in range(count - 1):
        layers += conv_bn_relu(out_channels, out_channels, 3, padding=1)
    return layers


def _pool(ceil_mode: bool = False) -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode)


class L2Norm(nn.Module):
    """SSD's per-position L2 normalisation of conv4_3 with a learned per-channel scale (init 20).

    It rescales conv4_3, whose activations are much larger than those of later maps, before it
    feeds the head (Liu et al. 2016, after ParseNet). It is not a batch statistic, so it stays in
    place whatever norm the study swaps in; with BN it is largely redundant but harmless, and it
    keeps ``norm=none`` runs equal to the original SSD.
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


class VGG16Trunk(nn.Module):
    """SSD's VGG16: conv1_1..conv4_3 -> map 0; pool4, conv5_x, pool5, fc6, fc7 -> map 1.

    The SSD modifications of VGG16 (Liu et al. 2016, Sec. 3): pool3 rounds up (so a 300 px input
    gives a 38 px conv4_3), pool5 is 3x3 stride 1, fc6 is a 3x3 conv with dilation 6 and fc7 a 1x1
    conv, both 16 x ``base_width`` wide (1024 at the standard ``base_width=64``).
    """

    def __init__(self, base_width: int = 64, l2norm: bool = True) -> None:
        super().__init__()
        w, fc = base_width, 16 * base_width
        self.to_conv4_3 = nn.Sequential(
            *_convs(3, w, 2),
            _pool(),
            *_convs(w, 2 * w, 2),
            _pool(),
            *_convs(2 * w, 4 * w, 3),
            _pool(ceil_mode=True),
            *_convs(4 * w, 8 * w, 3),
        )
        self.to_fc7 = nn.Sequential(
            _pool(),
            *_convs(8 * w, 8 * w, 3),
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            *conv_bn_relu(8 * w, fc, 3, padding=6, dilation=6),  # fc6
            *conv_bn_relu(fc, fc, 1),  # fc7
        )
        self.l2norm = L2Norm(8 * w) if l2norm else nn.Identity()
        self.out_channels = [8 * w, fc]

    def forward(self, x: Tensor) -> list[Tensor]:
        conv4_3 = self.to_conv4_3(x)
        return [self.l2norm(conv4_3), self.to_fc7(conv4_3)]
