"""``python -m cbn_detect.bench infer``: batch-1 detection speed, torchvision as-is against a fast path.

Both paths run the same torchvision RetinaNet with the same weights, pre- and post-processing
included (``model([image])`` -> boxes). The fast path (``fast_path``) changes only how the network
is executed: BN folded into the convolutions, ``inference_mode``, anchors cached (the pieces the
evaluations also use, from ``cbn_detect.models.fold``), and on request channels-last, a bf16
network with fp32 post-processing, and ``torch.compile``. Before timing, the
two paths' detections are compared box by box; in fp32 any mismatch is an error (exit code 1).

Random weights would make the timing unrepresentative: the classifier's prior bias puts every
score at 0.01, below the 0.05 threshold, so post-processing would run on nothing.
``spread_scores`` rescales the classifier so scores spread widely and every level fills its top-k
candidates, the heaviest post-processing a trained detector can ask for.

The paths alternate image by image (the order rotating every round) and the table reports medians.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from cbn_detect.bench.common import add_device_option, device_name, interleaved_medians, parse_with_tiny, timed_ms
from cbn_detect.bench.train import R50, TINY_ARCH, arch_of, torchvision_retinanet
from cbn_detect.models.fold import CachedAnchors, fold_norms

TINY = dict(size=64, images=3, warmup=1)
DISTINCT_IMAGES = 4  # inputs cycle through this many random images


class Autocast(nn.Module):
    """Runs ``module`` under bf16 autocast and hands back fp32 tensors.

    Autocasting the whole detector would also give torchvision's anchors and box decoding the
    features' dtype; bf16 cannot hold pixel coordinates of a 512 px image to a pixel, so only the
    network runs in bf16 and post-processing stays in fp32.
    """

    def __init__(self, module: nn.Module, device_type: str) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type

    def forward(self, *args: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return _to_float(self.module(*args))


def _to_float(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float()
    if isinstance(value, Mapping):
        return type(value)((k, _to_float(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float(v) for v in value)
    return value


def fast_path(
    model: RetinaNet, device: torch.device, dtype: str, channels_last: bool, compile_mode: str | None
) -> RetinaNet:
    """An eval-mode copy of ``model`` with the same weights, to be called under ``inference_mode``."""
    fast = copy.deepcopy(model).eval()
    fold_norms(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    if dtype == "bf16":
        fast.backbone = Autocast(fast.backbone, device.type)
        fast.head = Autocast(fast.head, device.type)
    fast.anchor_generator = CachedAnchors(fast.anchor_generator)
    if compile_mode is not None:
        fast.backbone.compile(mode=compile_mode)
        fast.head.compile(mode=compile_mode)
    return fast


@torch.no_grad()
def spread_scores(model: RetinaNet, image: Tensor, mean: float = -4.0, std: float = 2.0) -> None:
    """Rescale the classifier so that its logits on ``image`` have this mean and spread.

    With std 2, neighbouring scores in the top-k lie far apart compared with rounding, so the two
    paths can be compared detection by detection; with mean -4 a third of all (anchor, class)
    scores pass torchvision's 0.05 threshold.
    """
    conv = model.head.classification_head.cls_logits
    seen: list[Tensor] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.flatten().float()))
    try:
        model.eval()([image])
    finally:
        handle.remove()
    logits = torch.cat(seen)
    scale = std / logits.std()
    conv.weight.mul_(scale)
    conv.bias.sub_(logits.mean()).mul_(scale).add_(mean)


def matched_detections(
    reference: list[dict[str, Tensor]], fast: list[dict[str, Tensor]], atol: float
) -> tuple[int, int]:
    """(reference detections the fast path also found, reference detections).

    Found means a fast detection of the same class with every corner within ``atol`` pixels;
    matching by position rather than by rank, since rounding may swap two near-equal scores.
    """
    matched = total = 0
    for ref, got in zip(reference, fast):
        same_class = ref["labels"][:, None] == got["labels"][None, :]
        distance = (ref["boxes"][:, None, :].float() - got["boxes"][None, :, :].float()).abs().amax(dim=-1)
        matched += int((same_class & (distance <= atol)).any(dim=1).sum())
        total += len(ref["boxes"])
    return matched, total


def check(reference: RetinaNet, fast: RetinaNet, images: list[Tensor], atol: float) -> tuple[int, int]:
    """Both paths' detections on each of ``images``, compared. cuDNN's TF32 is off meanwhile, so
    that an fp32 fast path is held to fp32 rounding."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            expected = [reference([image])[0] for image in images]
        with torch.inference_mode():
            found = [fast([image])[0] for image in images]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return matched_detections(expected, found, atol)


def benchmark(args: argparse.Namespace) -> tuple[list[tuple[str, float, float, float]], tuple[int, int]]:
    """Rows (path, median ms per image, FPS, ratio to torchvision) and the detection check."""
    torch.manual_seed(0)
    model = torchvision_retinanet(arch_of(args), args.size).to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=gen).to(args.device) for _ in range(DISTINCT_IMAGES)]
    spread_scores(model, images[0])
    fast = fast_path(model, args.device, args.dtype, args.channels_last, args.compile)
    agreement = check(model, fast, images, args.atol)

    def reference_call(image: Tensor) -> None:
        with torch.no_grad():
            model([image])

    def fast_call(image: Tensor) -> None:
        with torch.inference_mode():
            fast([image])

    paths: dict[str, Callable[[Tensor], None]] = {"torchvision": reference_call, "fast": fast_call}

    def measure(path: str, round_: int) -> float:
        return timed_ms(lambda: paths[path](images[round_ % len(images)]), args.device)

    medians = interleaved_medians(list(paths), args.warmup, args.images, measure)
    rows = [(label, ms, 1e3 / ms, medians[0] / ms) for label, ms in zip(paths, medians)]
    return rows, agreement


def format_table(
    rows: list[tuple[str, float, float, float]], agreement: tuple[int, int], args: argparse.Namespace
) -> str:
    header = (
        f"# infer: torchvision RetinaNet {arch_of(args).name} (random weights, scores spread), batch 1 x "
        f"{args.size}px with pre- and post-processing, device {device_name(args.device)}, "
        f"torch {torch.__version__}, median of {args.images} interleaved images"
    )
    lines = [header, f"{'path':<14}{'ms_per_image':>14}{'fps':>10}{'ratio_to_torchvision':>22}"]
    lines += [f"{label:<14}{ms:>14.2f}{fps:>10.2f}{ratio:>22.2f}" for label, ms, fps, ratio in rows]
    steps = ["BN folded into the convs", "inference_mode", "cached anchors"]
    steps += ["channels_last"] * args.channels_last
    steps += ["bf16 backbone and head, fp32 post-processing"] * (args.dtype == "bf16")
    steps += [f"compiled backbone and head (mode {args.compile})"] * (args.compile is not None)
    lines.append(f"# fast path: {', '.join(steps)}")
    matched, total = agreement
    lines.append(
        f"# detections: the fast path found {matched}/{total} of torchvision's (same class, corners "
        f"within {args.atol:g} px)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cbn_detect.bench infer", description=__doc__)
    add_device_option(p)
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--images", type=int, default=100, help="timed images per path")
    p.add_argument("--warmup", type=int, default=10, help="untimed images per path")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the fast path's network dtype")
    p.add_argument("--channels-last", action="store_true", help="the fast path's memory format")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch.compile the fast path's backbone and head (optionally a mode: reduce-overhead adds CUDA graphs)",
    )
    p.add_argument("--atol", type=float, default=1.0, help="box tolerance (px) of the detection check")
    return parse_with_tiny(p, argv, TINY, f"a {TINY_ARCH.name} model instead of {R50.name}")


def run(argv: list[str]) -> int:
    """Print the table; 1 if an fp32 fast path misses any of torchvision's detections."""
    args = parse_args(argv)
    rows, agreement = benchmark(args)
    print(format_table(rows, agreement, args))
    matched, total = agreement
    return 1 if args.dtype == "fp32" and matched < total else 0
