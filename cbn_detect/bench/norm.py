"""``python -m cbn_detect.bench norm``: training-step time of a ResNet trunk under every norm.

All variants live in one process and are stepped round-robin (the order rotating every round),
so clock boosts, thermal drift and other load hit every norm alike; the table reports medians.
CBN variants run with ``burnin=0`` and a warm-up longer than the window, so what is timed is the
full-window steady state, not the plain-BN burn-in.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from cbn_detect.bench.common import Variant, add_device_option, interleaved_medians, parse_with_tiny, timed_train_step
from cbn_detect.norm.convert import convert_norm
from cbn_detect.norm.registry import NORM_NAMES

TINY = dict(arch="resnet18", batch=2, size=64, iters=3, warmup=2)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cbn:fused=off,window=2"`` -> ("cbn", {"fused": "off", "window": 2})."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return name, options


def build_variant(spec: str, args: argparse.Namespace) -> Variant:
    name, options = parse_spec(spec)
    if name.startswith("cbn"):
        options.setdefault("burnin", 0)
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, args.arch)(weights=None)
    trunk = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool + fc: a detector's body
    trunk = convert_norm(trunk, name, **options).to(args.device)
    if args.channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    return Variant(spec, trunk, torch.optim.SGD(trunk.parameters(), lr=1e-4))


def benchmark(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(norm, median step ms, ratio to bn) per requested norm, bn first."""
    specs = ["bn"] + [s for s in args.norms if s != "bn"]
    variants = [build_variant(s, args) for s in specs]
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)

    def loss(trunk: nn.Module) -> Tensor:
        return trunk(x).float().square().mean()

    medians = interleaved_medians(
        variants, args.warmup, args.iters, lambda v, _: timed_train_step(v, loss, args.device, args.dtype == "bf16")
    )
    return [(v.label, m, m / medians[0]) for v, m in zip(variants, medians)]


def format_table(rows: list[tuple[str, float, float]], args: argparse.Namespace) -> str:
    header = (
        f"# {args.arch} trunk, batch {args.batch} x {args.size}px, {args.dtype}"
        f"{', channels_last' if args.channels_last else ''}, device {args.device}, "
        f"torch {torch.__version__}, median of {args.iters} interleaved steps"
    )
    lines = [header, f"{'norm':<24}{'step_ms':>10}{'ratio_to_bn':>13}"]
    lines += [f"{label:<24}{ms:>10.2f}{ratio:>13.2f}" for label, ms, ratio in rows]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cbn_detect.bench norm", description=__doc__)
    add_device_option(p)
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--iters", type=int, default=20, help="timed steps per norm")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per norm (>= CBN window)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--norms", type=lambda s: s.split(), default=None,
        help="space-separated norm specs, name[:key=value,...], e.g. 'cbn cbn:fused=off'; default: "
        "every norm, plus CBN's reference path on CUDA (where CBN is compiled by default)",
    )
    args = parse_with_tiny(p, argv, TINY)
    if args.norms is None:
        args.norms = list(NORM_NAMES) + (["cbn:fused=off"] if args.device.type == "cuda" else [])
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    print(format_table(benchmark(args), args))
    return 0
