"""The GPU paths compute what the CPU-tested ones do: CBN's compiled window against its reference
path, ``nn.SyncBatchNorm`` without a process group against BN, a few mixed-precision training steps
finite under every norm, and the fast inference path's detections against torchvision's.

On a CUDA device the checks run at the sizes of a small detector's trunk (ResNet-18, batch 8 at
160 px); the ones that mean something on a CPU too also run there at tiny sizes, which is all a
machine without a GPU checks. Tolerances are relative to the largest value compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cbn_detect.bench import infer
from cbn_detect.bench.train import R50, torchvision_retinanet
from cbn_detect.engine.precision import Precision
from cbn_detect.models.backbone import ResNetTrunk
from cbn_detect.norm import NORM_NAMES, convert_norm, norm_diagnostics, use_native_sync_batchnorm
from tests.helpers.run_if import RunIf

FUSED_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
"""Largest difference of CBN's compiled path from its reference (bf16: the rounding of autocast)."""
SYNCBN_TOLERANCE = 1e-5
"""Largest difference of ``nn.SyncBatchNorm`` from BN (cuDNN's backward is not deterministic)."""
MAX_SKIPPED = 20
"""Overflowing fp16 steps in a row allowed while the loss scale settles (``train.max_nonfinite``)."""


@dataclass(frozen=True)
class TrunkSize:
    depth: str
    width: int
    batch: int
    side: int
    steps: int  # SGD steps of a check


SIZES = {
    "cuda": TrunkSize("resnet18", 64, batch=8, side=160, steps=6),
    "cpu": TrunkSize("resnet10", 8, batch=2, side=32, steps=2),
}
DEVICES = ["cpu", pytest.param("cuda", marks=RunIf(cuda=True).marks)]


def relative_gap(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |a| (the gap itself when ``a`` is all zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(a.abs().max())
    gap = float((a - b).abs().max())
    return gap / scale if scale > 0 else gap


def small_trunk(device: torch.device, norm: str, **options: Any) -> nn.Module:
    """A from-scratch ResNet trunk (stem and 4 stages) with ``norm``, on ``device``, seeded; on CUDA
    with the synchronised norms as ``nn.SyncBatchNorm``, as training builds them there."""
    torch.manual_seed(0)
    size = SIZES[device.type]
    trunk = nn.Sequential(*ResNetTrunk(size.depth, size.width).children())
    trunk = convert_norm(trunk, norm, **options).to(device)
    if device.type == "cuda":
        trunk = use_native_sync_batchnorm(trunk)
    return trunk.train()


def trunk_batches(device: torch.device) -> list[Tensor]:
    size = SIZES[device.type]
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(size.batch, 3, size.side, size.side, generator=gen).to(device) for _ in range(size.steps)]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def finite(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def norm_options(name: str) -> dict[str, Any]:
    """Options that put each norm on its full training path at step 0: CBN without burn-in, BRN
    with its (r, d) correction already open."""
    if name in ("cbn", "cbn_naive"):
        return {"burnin": 0}
    if name == "brn":
        return {"ramp_start": 0, "ramp_end": 1}
    return {}


@RunIf(cuda=True)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cbn_compiled_window_matches_its_reference_path(dtype: str) -> None:
    """``norm.fused=on`` against ``off`` over a few SGD steps with a full window: outputs and the
    first conv's weight gradient agree, and the window really averaged more than one step."""
    device = torch.device("cuda")
    models = {fused: small_trunk(device, "cbn", burnin=0, window=4, fused=fused) for fused in ("off", "on")}
    optimizers = {key: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for key, m in models.items()}
    out_gap = grad_gap = 0.0
    for x in trunk_batches(device):
        seen = {}
        for key, model in models.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                out = model(x)
            out.float().square().mean().backward()
            seen[key] = (out.detach().float(), first_conv(model).weight.grad.detach().clone())
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
        out_gap = max(out_gap, relative_gap(seen["off"][0], seen["on"][0]))
        grad_gap = max(grad_gap, relative_gap(seen["off"][1], seen["on"][1]))
    assert out_gap <= FUSED_TOLERANCE[dtype] and grad_gap <= FUSED_TOLERANCE[dtype], (out_gap, grad_gap)
    windows = [v for k, v in norm_diagnostics(models["on"]).items() if k.endswith("/effective_window")]
    assert windows and min(windows) > 1, windows


@pytest.mark.parametrize("device", DEVICES)
def test_native_syncbn_without_a_process_group_equals_bn(device: str) -> None:
    """Our SyncBN swapped for ``nn.SyncBatchNorm`` (``use_native_sync_batchnorm``), no DDP and no
    NCCL: outputs, gradients and running statistics over a few SGD steps equal plain BN's."""
    assert not (dist.is_available() and dist.is_initialized()), "this check is for the path without a process group"
    device = torch.device(device)
    bn = small_trunk(device, "bn")
    sync = use_native_sync_batchnorm(small_trunk(device, "syncbn"))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (bn, sync)]
    out_gap = grad_gap = 0.0
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same convolution algorithms on both sides
    try:
        for x in trunk_batches(device):
            outs, grads = [], []
            for model, optimizer in zip((bn, sync), optimizers):
                out = model(x)
                out.square().mean().backward()
                outs.append(out.detach())
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out_gap = max(out_gap, relative_gap(*outs))
            grad_gap = max(grad_gap, relative_gap(*grads))
    finally:
        torch.backends.cudnn.deterministic = deterministic
    stats_gap = max(relative_gap(a, b) for a, b in zip(bn.buffers(), sync.buffers()) if a.is_floating_point())
    assert max(out_gap, grad_gap, stats_gap) <= SYNCBN_TOLERANCE, (out_gap, grad_gap, stats_gap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("norm", NORM_NAMES)
def test_mixed_precision_training_steps_stay_finite(device: str, mode: str, norm: str) -> None:
    """A few applied training steps under autocast, the trainer's ``Precision`` doing the loss
    scaling: an fp16 step whose gradients overflow is skipped and lowers the loss scale, as in
    training, up to ``MAX_SKIPPED`` in a row (the scale starts at 2^16 and may need a few halvings).
    Losses, parameters and statistics stay finite."""
    device = torch.device(device)
    batches = trunk_batches(device)
    model = small_trunk(device, norm, **norm_options(norm))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    precision = Precision(mode, device)
    losses, applied, skipped_in_a_row = [], 0, 0
    while applied < len(batches) and skipped_in_a_row <= MAX_SKIPPED:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = model(batches[applied]).float().square().mean()
        precision.backward(loss)
        precision.unscale(optimizer)
        if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None):
            precision.step(optimizer)
            applied, skipped_in_a_row = applied + 1, 0
        else:
            precision.skip()
            skipped_in_a_row += 1
        losses.append(float(loss.detach()))
    assert applied == len(batches), f"{len(losses) - applied} steps skipped, {skipped_in_a_row} in a row at the end"
    assert all(math.isfinite(v) for v in losses), losses
    assert finite(model)


@RunIf(cuda=True)
def test_fast_inference_path_finds_torchvisions_detections() -> None:
    """``bench infer``'s fast path (norms folded, inference mode, cached anchors) on RetinaNet-R50 at
    512 px in fp32: every torchvision detection found again, same class, corners within 1 px."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torchvision_retinanet(R50, 512).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 512, 512, generator=gen).to(device) for _ in range(infer.DISTINCT_IMAGES)]
    infer.spread_scores(model, images[0])
    fast = infer.fast_path(model, device, "fp32", channels_last=False, compile_mode=None)
    matched, total = infer.check(model, fast, images, atol=1.0)
    assert total > 0 and matched == total, (matched, total)
