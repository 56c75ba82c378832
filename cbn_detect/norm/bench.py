"""``python -m cbn_detect.bench norm``: training-step time of a ResNet trunk under every norm.

All variants live in one process and are stepped round-robin (the order rotating every round),
so clock boosts, thermal drift and other load hit every norm alike; the table reports medians.
CBN variants run with ``burnin=0`` and a warm-up longer than the window, so what is timed is the
full-window steady state, not the plain-BN burn-in.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from cbn_detect.norm.convert import convert_norm
from cbn_detect.norm.registry import NORM_NAMES

TINY = dict(arch="resnet18", batch=2, size=64, iters=3, warmup=2)


@dataclass
class Variant:
    """One norm under test: its own copy of the trunk, optimizer and step times."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times_ms: list[float]


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
    return Variant(spec, trunk, torch.optim.SGD(trunk.parameters(), lr=1e-4), [])


def train_step(v: Variant, x: torch.Tensor, args: argparse.Namespace) -> float:
    """One timed step (ms): forward, backward, optimizer update, device-synchronised both ends."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    v.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        out = v.model(x)
    out.float().square().mean().backward()
    v.optimizer.step()
    sync()
    return (time.perf_counter() - start) * 1e3


def benchmark(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(norm, median step ms, ratio to bn) per requested norm, bn first."""
    specs = ["bn"] + [s for s in args.norms if s != "bn"]
    variants = [build_variant(s, args) for s in specs]
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    for round_ in range(args.warmup + args.iters):
        shift = round_ % len(variants)
        for v in variants[shift:] + variants[:shift]:
            elapsed = train_step(v, x, args)
            if round_ >= args.warmup:
                v.times_ms.append(elapsed)
    medians = [statistics.median(v.times_ms) for v in variants]
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    p.add_argument("--tiny", action="store_true", help=f"CPU preset, explicit options win: {TINY}")
    if "--tiny" in argv:
        p.set_defaults(**TINY)
    args = p.parse_args(argv)
    if args.norms is None:
        args.norms = list(NORM_NAMES) + (["cbn:fused=off"] if args.device.startswith("cuda") else [])
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    print(format_table(benchmark(args), args))
    return 0
