"""``python -m cbn_detect.bench norm``: training-step time of a ResNet trunk or a RetinaNet under every norm.

All variants live in one process and are stepped round-robin (the order rotating every round),
so clock boosts, thermal drift and other load hit every norm alike; the table reports medians.
CBN variants run with ``burnin=0`` and a warm-up longer than the window, so what is timed is the
full-window steady state, not the plain-BN burn-in. ``history_MiB`` is the memory CBN's stored
window holds in that model (0 for other norms); ``--history`` only builds the models and prints
that column, without timing (e.g. RetinaNet-R50, too slow to train on a CPU).

``--model trunk`` (default) times a torchvision ResNet without its pooling and classifier on
random images, loss = mean square of the features. ``--model retinanet_tiny`` / ``retinanet_r50``
times the whole detector as ``conf/model/<name>.yaml`` builds it (the norm in backbone, FPN and
head, as ``conf/norm/*.yaml`` place it), on synthetic images with random boxes (``bench train``'s
batch), loss = the sum of its training losses.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import OmegaConf
from torch import Tensor, nn

from cbn_detect.bench.common import (
    Variant,
    add_device_option,
    interleaved_medians,
    parse_with_tiny,
    timed_train_step,
    torch_threads,
)
from cbn_detect.bench.train import NUM_CLASSES, synthetic_batch
from cbn_detect.models import build_retinanet
from cbn_detect.norm.cbn import CrossIterationBatchNorm2d
from cbn_detect.norm.convert import REGIONS, convert_norm
from cbn_detect.norm.registry import NORM_NAMES

TINY = dict(arch="resnet18", batch=2, size=64, iters=3, warmup=2)
MODELS = ("trunk", "retinanet_tiny", "retinanet_r50")
CONF_MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


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


def detector_settings(model: str, size: int) -> dict[str, Any]:
    """``build_retinanet``'s keyword arguments from ``conf/model/<model>.yaml`` over its base, with
    ``min_size = max_size = size`` so the detector's own resize is the identity."""
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF_MODEL_DIR / "base" / "retinanet.yaml"), OmegaConf.load(CONF_MODEL_DIR / f"{model}.yaml")
    )
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in ("defaults", "_target_", "name"):
        settings.pop(key, None)
    return {**settings, "min_size": size, "max_size": size}


def build_model(name: str, options: dict[str, Any], args: argparse.Namespace) -> nn.Module:
    """The model of ``--model`` with every norm layer ``name`` (seeded: every variant starts alike)."""
    torch.manual_seed(0)
    if args.model == "trunk":
        resnet = getattr(torchvision.models, args.arch)(weights=None)
        model = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool + fc: a detector's body
        return convert_norm(model, name, **options)
    model = build_retinanet(NUM_CLASSES, **detector_settings(args.model, args.size))
    return convert_norm(model, name, where=REGIONS, **options)


def history_bytes(model: nn.Module) -> int:
    """Bytes held by the stored windows of the model's CBN layers."""
    return sum(m.history_bytes() for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d))


def build_variant(spec: str, args: argparse.Namespace) -> Variant:
    name, options = parse_spec(spec)
    if name.startswith("cbn"):
        options.setdefault("burnin", 0)
    model = build_model(name, options, args).to(args.device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Variant(spec, model, torch.optim.SGD(model.parameters(), lr=1e-4))


def make_loss(args: argparse.Namespace):
    if args.model == "trunk":
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        if args.channels_last:
            x = x.to(memory_format=torch.channels_last)

        def loss(model: nn.Module) -> Tensor:
            return model(x).float().square().mean()

        return loss
    images, targets = synthetic_batch(args.batch, args.size, args.device)

    def detector_loss(model: nn.Module) -> Tensor:
        return sum(model(images, targets).values())

    return detector_loss


def benchmark(args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    """(norm, median step ms, ratio to bn, history MiB) per requested norm, bn first; with
    ``--history``, the models are only built (step times are NaN)."""
    specs = ["bn"] + [s for s in args.norms if s != "bn"]
    variants = [build_variant(s, args) for s in specs]
    history = [history_bytes(v.model) / 2**20 for v in variants]
    if args.history:
        return [(v.label, float("nan"), float("nan"), h) for v, h in zip(variants, history)]
    loss = make_loss(args)
    medians = interleaved_medians(
        variants, args.warmup, args.iters, lambda v, _: timed_train_step(v, loss, args.device, args.dtype == "bf16")
    )
    return [(v.label, m, m / medians[0], h) for v, m, h in zip(variants, medians, history)]


def describe_model(args: argparse.Namespace) -> str:
    return f"{args.arch} trunk" if args.model == "trunk" else f"{args.model} detector"


def format_table(rows: list[tuple[str, float, float, float]], args: argparse.Namespace) -> str:
    what = "history of the built models (not trained)" if args.history else f"median of {args.iters} interleaved steps"
    header = (
        f"# {describe_model(args)}, batch {args.batch} x {args.size}px, {args.dtype}"
        f"{', channels_last' if args.channels_last else ''}, device {args.device}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, {what}"
    )
    lines = [header, f"{'norm':<24}{'step_ms':>10}{'ratio_to_bn':>13}{'history_MiB':>13}"]
    lines += [f"{label:<24}{ms:>10.2f}{ratio:>13.2f}{mib:>13.1f}" for label, ms, ratio, mib in rows]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cbn_detect.bench norm", description=__doc__)
    add_device_option(p)
    p.add_argument("--model", default="trunk", choices=MODELS, help="a ResNet trunk (--arch) or a RetinaNet")
    p.add_argument(
        "--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"], help="--model trunk only"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--iters", type=int, default=20, help="timed steps per norm")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per norm (>= CBN window)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--history", action="store_true", help="only build the models and report CBN's history memory")
    p.add_argument(
        "--norms",
        type=lambda s: s.split(),
        default=None,
        help="space-separated norm specs, name[:key=value,...], e.g. 'cbn cbn:fused=off'; default: "
        "every norm, plus CBN's reference path on CUDA (where CBN is compiled by default)",
    )
    args = parse_with_tiny(p, argv, TINY)
    if args.norms is None:
        args.norms = list(NORM_NAMES) + (["cbn:fused=off"] if args.device.type == "cuda" else [])
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        print(format_table(benchmark(args), args))
    return 0
