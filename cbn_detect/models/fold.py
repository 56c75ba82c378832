"""The inference fast path: a detector copy with its norms folded into the convolutions feeding them.

In eval mode every BatchNorm-like layer of the study (``nn.BatchNorm2d`` and its subclasses BRN,
CBN and our SyncBN, torch's ``nn.SyncBatchNorm``, torchvision's ``FrozenBatchNorm2d``) is one fixed
affine map per channel, ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``. After
the conv that produces ``x`` it can be folded into that conv: weight ``W * s``, bias
``(b - running_mean) * s + bias_norm`` with ``s = weight / sqrt(running_var + eps)``, which saves
one pass over every feature map. GroupNorm normalises with statistics of each image and cannot be
folded; it stays (as do layers in training mode, and any norm whose producer is not certain).

:func:`inference_copy` is what the evaluation and the FPS measurement run: a deep copy of the
model (the model itself stays untouched, in whatever mode it was), in eval mode, norms folded,
anchors cached, every call under ``torch.inference_mode``. Its detections equal the model's up to
float rounding of the fold (tested detection by detection on the tiny RetinaNet and SSD with BN and
CBN). ``torch.compile`` applied in place (``train.compile``) is not carried over: the copy runs
eager, since compiling a fresh copy at every evaluation would cost more than it saves.

The caller guarantees that a ``BatchNorm2d`` subclass normalises with its running statistics in
eval mode, as BatchNorm2d does (every norm of ``cbn_detect.norm`` does; a test checks each one).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

from cbn_detect.models.retinanet import PerLevelNormTower

log = logging.getLogger(__name__)

FOLDABLE_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
"""Norm types that are a fixed per-channel affine map in eval mode (subclasses included)."""

ANCHOR_CACHE_SIZE = 32
"""Anchor sets kept by :class:`CachedAnchors`: a padded batch shape each (a handful for SSD's fixed
size, a few dozen for RetinaNet on VOC's varied image shapes)."""


def foldable(conv: nn.Module | None, norm: nn.Module) -> bool:
    """Whether ``norm`` is an eval-mode running-statistics affine map that fits ``conv``'s output."""
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(norm, FOLDABLE_NORMS)
        and getattr(norm, "running_mean", None) is not None
        and getattr(norm, "running_var", None) is not None
        and norm.running_mean.shape == (conv.out_channels,)
        and not (conv.training or norm.training)
    )


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A new conv (with a bias, no hooks, no gradient) computing ``norm(conv(x))``; the fold itself
    is computed in float64 and rounded once to the conv's dtype."""
    if not foldable(conv, norm):
        raise ValueError(f"cannot fold {type(norm).__name__} into {type(conv).__name__} (see foldable())")
    weight = conv.weight.detach()
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    wide = torch.float64
    mean, var = norm.running_mean.to(wide), norm.running_var.to(wide)
    gamma = norm.weight.detach().to(wide) if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.detach().to(wide) if norm.bias is not None else torch.zeros_like(mean)
    bias = conv.bias.detach().to(wide) if conv.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + float(norm.eps))
    fused.weight.copy_(weight.to(wide) * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - mean) * scale + beta)
    fused.requires_grad_(False)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        fused.to(memory_format=torch.channels_last)
    return fused.train(False)


class FoldedPerLevelTower(nn.Module):
    """A :class:`PerLevelNormTower` with each level's norms folded: the shared convs are unshared,
    one folded copy per level (``convs[i][level]``), so the head runs conv -> ReLU only."""

    def __init__(self, tower: PerLevelNormTower) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.ModuleList(fold_conv_norm(conv, norm) for norm in norms) for conv, norms in zip(tower.conv, tower.norms)
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def applies(tower: nn.Module) -> bool:
        return type(tower) is PerLevelNormTower and all(
            foldable(conv, norm) for conv, norms in zip(tower.conv, tower.norms) for norm in norms
        )

    def forward(self, x: Tensor, level: int) -> Tensor:
        for convs in self.convs:
            x = self.relu(convs[level](x))
        return x


def fold_norms(module: nn.Module) -> int:
    """Fold, in place, every foldable norm into the conv that directly feeds it; the number folded.

    A norm is folded only where its producer is certain, the rules ``convert_norm`` wires CBN by:
    the conv just before it in an ``nn.Sequential`` (SSD's conv-norm-ReLU blocks, ResNet
    downsamples, torchvision's ``Conv2dNormActivation`` in the FPN), its sibling ``conv<k>`` for a
    ``bn<k>`` (ResNet blocks and stem), and our RetinaNet head's per-level tower (one shared conv,
    one norm per level: see :class:`FoldedPerLevelTower`). A folded norm becomes ``nn.Identity``.
    """
    folded = 0
    for name, child in list(module.named_children()):
        if FoldedPerLevelTower.applies(child):
            setattr(module, name, FoldedPerLevelTower(child))
            folded += sum(len(norms) for norms in child.norms)
        else:
            folded += fold_norms(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            if foldable(module[i], module[i + 1]):
                module[i] = fold_conv_norm(module[i], module[i + 1])
                module[i + 1] = nn.Identity()
                folded += 1
    for name, child in list(module.named_children()):
        conv_name = "conv" + name[2:]
        conv = getattr(module, conv_name, None) if name.startswith("bn") else None
        if foldable(conv, child):
            setattr(module, conv_name, fold_conv_norm(conv, child))
            setattr(module, name, nn.Identity())
            folded += 1
    return folded


def count_norms(module: nn.Module) -> int:
    """Norm layers of any kind left in ``module`` (BatchNorm-like ones and GroupNorm)."""
    return sum(isinstance(m, (*FOLDABLE_NORMS, nn.GroupNorm)) for m in module.modules())


class CachedAnchors(nn.Module):
    """torchvision's anchor generator (``AnchorGenerator``, ``DefaultBoxGenerator``), memoised.

    Anchors are a function of the padded batch shape and the feature-map sizes only, yet
    torchvision rebuilds them on every call, a dozen small kernels that show at batch 1. The last
    ``size`` anchor sets are kept (least recently used dropped first).
    """

    def __init__(self, generator: nn.Module, size: int = ANCHOR_CACHE_SIZE) -> None:
        super().__init__()
        self.generator = generator
        self.size = size
        self._cache: OrderedDict[tuple[Any, ...], list[Tensor]] = OrderedDict()

    def num_anchors_per_location(self) -> list[int]:
        return self.generator.num_anchors_per_location()

    def forward(self, image_list: ImageList, features: list[Tensor]) -> list[Tensor]:
        key = (
            tuple(image_list.tensors.shape),
            tuple(tuple(f.shape[-2:]) for f in features),
            features[0].dtype,
            features[0].device,
        )
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self.generator(image_list, features)
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return self._cache[key]


class InferenceModel(nn.Module):
    """A model run under ``torch.inference_mode`` and kept in eval mode (``train()`` is a no-op
    towards training: the folded network has no norms left to train)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(False)

    def train(self, mode: bool = True) -> InferenceModel:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.model(*args, **kwargs)


def _drop_compilation(module: nn.Module) -> None:
    """Forget ``Module.compile``: a deep copy would keep the compiled ``_call_impl`` of the original
    module (a function, which ``deepcopy`` shares), silently running the original's weights."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None


def inference_copy(model: nn.Module) -> InferenceModel:
    """The fast path the evaluations run: an eval-mode copy of ``model`` with the same weights and
    detections, its norms folded into their convs and its anchors cached, called under
    ``inference_mode``. ``model`` itself is left untouched (mode, weights, norm state)."""
    fast = copy.deepcopy(model)
    _drop_compilation(fast)
    fast.eval().requires_grad_(False)
    folded = fold_norms(fast)
    generator = getattr(fast, "anchor_generator", None)
    if isinstance(generator, nn.Module) and not isinstance(generator, CachedAnchors):
        fast.anchor_generator = CachedAnchors(generator)
    log.debug("inference copy: %d norm layers folded into their convs, %d left", folded, count_norms(fast))
    return InferenceModel(fast)
