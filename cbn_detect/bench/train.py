"""``python -m cbn_detect.bench train``: our RetinaNet's training throughput against torchvision's.

The detectors live in one process and take turns, one step each, the order rotating every round,
so clock boosts, thermal drift and other load hit all alike; the table reports medians. They see
identical inputs: fixed-size random images with a few random boxes each, built once. A step is
what the trainer does minus its bookkeeping: forward with the loss, backward, optimizer update.

Three rows: ``torchvision`` (its v1 RetinaNet and its per-image matching, losses and
post-processing), ``ours`` (our detector as the study trains it: BN also in the FPN and per level
in the head, and batch-wide matching and losses) and ``ours_tv_norms`` (our code on torchvision's
network: norms in the trunk only, the FPN and head convs with biases instead, the same parameters
as torchvision's). ``ours_tv_norms`` against ``torchvision`` is the code alone; ``ours`` against
``ours_tv_norms`` is what our norm placement costs.

All are built with ``min_size = max_size = --size`` so the detectors' own resize is the identity
and the network sees ``--size`` pixels exactly. ``--dtype``, ``--channels-last`` and ``--compile``
apply to all, so a ratio compares models, not settings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from cbn_detect.bench.common import (
    Variant,
    add_device_option,
    device_name,
    interleaved_medians,
    parse_with_tiny,
    timed_train_step,
    torch_threads,
)
from cbn_detect.models.backbone import ResNetTrunk
from cbn_detect.models.retinanet import anchor_generator, build_retinanet
from cbn_detect.norm import convert_norm

NUM_CLASSES = 20  # PASCAL VOC; every detector predicts NUM_CLASSES + 1 logits (0 = background)
BOXES_PER_IMAGE = 3

CAVEAT = (
    "# ours differs from torchvision's v1 RetinaNet by design: BN after every FPN conv, and one BN "
    "per FPN level after every head conv (torchvision: no norm outside the trunk); ours_tv_norms is "
    "our code on torchvision's network (norms in the trunk only), so its ratio is the code's alone; "
    "all rows: same trunk, matching rules, losses and post-processing results"
)
LABELS = ("torchvision", "ours", "ours_tv_norms")


@dataclass(frozen=True)
class Arch:
    """The size of a RetinaNet, shared by the builders so the models differ only in design."""

    name: str
    depth: str
    base_width: int
    fpn_channels: int
    extra_levels: str
    anchor_sizes: tuple[int, ...]


R50 = Arch("resnet50-FPN256", "resnet50", 64, 256, "p6p7", (32, 64, 128, 256, 512))
# retinanet_tiny's trunk and FPN, with 4 head convs like torchvision's head (retinanet_tiny has 2).
TINY_ARCH = Arch("resnet10w16-FPN64", "resnet10", 16, 64, "none", (16, 32, 64))
TINY = dict(batch=2, size=64, iters=3, warmup=1)


def arch_of(args: argparse.Namespace) -> Arch:
    """The model size a run measures: R50, or TINY_ARCH under ``--tiny`` (for this row and infer)."""
    return TINY_ARCH if args.tiny else R50


def ours_retinanet(arch: Arch, size: int, where: tuple[str, ...] | None = None) -> RetinaNet:
    """Our detector as ``train.py`` builds it with ``norm=bn`` (and ``norm.where=where``: the norm
    only there, none elsewhere; ``("backbone",)`` is torchvision's norm placement)."""
    model = build_retinanet(
        NUM_CLASSES,
        depth=arch.depth,
        base_width=arch.base_width,
        fpn_channels=arch.fpn_channels,
        extra_levels=arch.extra_levels,
        anchor_sizes=arch.anchor_sizes,
        head_convs=4,
        min_size=size,
        max_size=size,
    )
    return convert_norm(model, "bn", where=where)


def torchvision_retinanet(arch: Arch, size: int) -> RetinaNet:
    """torchvision's v1 RetinaNet, untrained (so BN, not FrozenBN, in the trunk).

    R50 is ``retinanet_resnet50_fpn`` itself. Other sizes have no torchvision builder, so they put
    torchvision's norm-free FPN and its default head on our trunk, which is torchvision's ResNet
    with a configurable width.
    """
    if arch == R50:
        return retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=size, max_size=size
        )
    trunk = ResNetTrunk(arch.depth, arch.base_width)
    extra = LastLevelP6P7(arch.fpn_channels, arch.fpn_channels) if arch.extra_levels == "p6p7" else None
    backbone = BackboneWithFPN(
        trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, trunk.stage_channels[1:], arch.fpn_channels, extra
    )
    if extra is None:
        backbone.fpn.extra_blocks = None  # BackboneWithFPN would add a max-pool level instead
    return RetinaNet(
        backbone,
        NUM_CLASSES + 1,
        min_size=size,
        max_size=size,
        anchor_generator=anchor_generator(arch.anchor_sizes),
    )


def synthetic_batch(
    batch: int, size: int, device: torch.device, seed: int = 0
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Random images with BOXES_PER_IMAGE random boxes (10-50 % of the side) of random classes."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=gen).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        wh = size * (0.1 + 0.4 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen))
        xy = (size - wh) * torch.rand(BOXES_PER_IMAGE, 2, generator=gen)
        labels = torch.randint(1, NUM_CLASSES + 1, (BOXES_PER_IMAGE,), generator=gen)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device), "labels": labels.to(device)})
    return images, targets


def prepare(label: str, model: RetinaNet, args: argparse.Namespace) -> Variant:
    """Apply the speed options; ``torch.compile`` covers the backbone only, where the time goes
    and where all detectors have the same structure."""
    model = model.to(args.device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.backbone.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return Variant(label, model, optimizer)


def benchmark(args: argparse.Namespace) -> list[tuple[str, float, float, float, float]]:
    """(model, parameters in M, median step ms, images/s, ratio to torchvision), torchvision first."""
    arch = arch_of(args)
    torch.manual_seed(0)
    models = (
        torchvision_retinanet(arch, args.size),
        ours_retinanet(arch, args.size),
        ours_retinanet(arch, args.size, where=("backbone",)),
    )
    variants = [prepare(label, model, args) for label, model in zip(LABELS, models)]
    images, targets = synthetic_batch(args.batch, args.size, args.device)

    def loss(model: nn.Module) -> Tensor:
        return sum(model(images, targets).values())

    medians = interleaved_medians(
        variants, args.warmup, args.iters, lambda v, _: timed_train_step(v, loss, args.device, args.dtype == "bf16")
    )
    rates = [args.batch * 1e3 / ms for ms in medians]
    return [(v.label, v.params_m, ms, rate, rate / rates[0]) for v, ms, rate in zip(variants, medians, rates)]


def format_table(rows: list[tuple[str, float, float, float, float]], args: argparse.Namespace) -> str:
    options = [args.dtype] + ["channels_last"] * args.channels_last + ["compiled backbone"] * args.compile
    header = (
        f"# train: RetinaNet {arch_of(args).name} from scratch, batch {args.batch} x {args.size}px, "
        f"{', '.join(options)}, device {device_name(args.device)}, {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}, median of {args.iters} interleaved steps"
    )
    lines = [header, f"{'model':<14}{'params_M':>10}{'step_ms':>10}{'images_per_s':>14}{'ratio_to_torchvision':>22}"]
    lines += [
        f"{label:<14}{params:>10.2f}{ms:>10.2f}{rate:>14.2f}{ratio:>22.2f}" for label, params, ms, rate, ratio in rows
    ]
    lines.append(CAVEAT)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cbn_detect.bench train", description=__doc__)
    add_device_option(p)
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--iters", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every backbone")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parse_with_tiny(p, argv, TINY, f"models of size {TINY_ARCH.name} instead of {R50.name}")


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        print(format_table(benchmark(args), args))
    return 0
