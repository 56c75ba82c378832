"""The arithmetic of Cross-Iteration BatchNorm, as pure functions of tensors.

Kept apart from the module so that the same function serves as the plain-PyTorch reference (CPU,
tests) and, wrapped in ``torch.compile``, as the fused path on CUDA; and so that the tests can check
each piece (derivatives, compensation, window combination) against autograd and brute force.

Shapes: ``y`` is the norm's input (N, C, H, W), i.e. the output of the producing conv whose input
is ``x`` and weight ``w`` (C, Cin/groups, kh, kw). History tensors carry a leading slot axis
(window - 1 slots, ``valid`` marking the filled ones). Statistics, history and derivatives are in
``statistics_dtype(y.dtype)``: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbn_detect.norm.dtypes import statistics_dtype


class ConvGeometry(NamedTuple):
    """What the derivatives need to know about the producing conv."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    weight_shape: tuple[int, int, int, int]


class TaylorInputs(NamedTuple):
    """What compensating the stored statistics to the current weight needs (see taylor_deltas)."""

    w_now: Tensor
    hist_weight: Tensor
    hist_patch: Tensor
    hist_dsq: Tensor
    groups: int


class WindowResult(NamedTuple):
    """One training step of CBN: the output plus what the module stores and reports."""

    out: Tensor  # normalized, affine-transformed input, dtype of y
    cur_mean: Tensor  # (C,) statistics dtype, this batch's mean (detached)
    cur_var: Tensor  # (C,) statistics dtype, this batch's biased variance (detached)
    count: Tensor  # (C,) entries averaged per channel, current batch included
    keep: Tensor  # (S, C) bool, stored entries that hold data and passed the variance check
    comp_mean: Tensor  # (S, C) stored means compensated to the current weight
    delta_mean: Tensor  # (S, C) the Taylor term added to the stored means (already times rho)


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """Resolve the conv's padding to explicit numbers; reject what the derivatives cannot express.

    Asymmetric 'same' padding and non-zero padding modes change which input pixels each output sees
    in ways the closed-form mean patch below does not model, so they are refused loudly.
    """
    if conv.padding_mode != "zeros":
        raise ValueError(f"CBN supports only zero-padded convs, got padding_mode={conv.padding_mode!r}")
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "valid":
        padding = (0, 0)
    elif conv.padding == "same":
        if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2:
            raise ValueError("CBN cannot handle asymmetric 'same' padding (even effective kernel)")
        padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    else:
        padding = tuple(conv.padding)
    return ConvGeometry(
        stride=tuple(conv.stride),
        padding=padding,
        dilation=(dh, dw),
        groups=conv.groups,
        weight_shape=tuple(conv.weight.shape),
    )


def mean_input_patch(
    x: Tensor, geom: ConvGeometry, out_hw: tuple[int, int], out: Tensor | None = None
) -> Tensor:
    """d mean(y_c) / d w_c: the conv's input patch averaged over batch and output positions.

    The patch seen at kernel offset (i, j) over all outputs is a strided crop of the zero-padded
    input, and crops along rows and columns are independent, so after summing the batch away the
    whole patch costs kh + kw strided sums instead of an unfold or a weight-gradient convolution;
    an unpadded 1x1 conv (most of a ResNet) needs a single strided mean.
    Returns (Cin, kh, kw) in ``out``'s dtype if given, else in the statistics dtype of x; for
    grouped convs, output channel c uses its group's Cin/groups rows.
    """
    _, _, kh, kw = geom.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    ho, wo = out_hw
    x = x.detach()
    dtype = statistics_dtype(x.dtype) if out is None else out.dtype
    if kh == kw == 1 and ph == pw == 0:
        crop = x[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw]
        flat = None if out is None else out.view(-1)
        return torch.mean(crop, dim=(0, 2, 3), dtype=dtype, out=flat).view(-1, 1, 1)
    xs = F.pad(x.sum(0, dtype=dtype), (pw, pw, ph, ph))  # (Cin, Hp, Wp)
    rows = torch.stack([xs[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh].sum(1) for i in range(kh)])
    # rows: (kh, Cin, Wp); cols: (kw, kh, Cin)
    cols = torch.stack([rows[..., j * dw : j * dw + sw * (wo - 1) + 1 : sw].sum(-1) for j in range(kw)])
    return torch.div(cols.permute(2, 1, 0), x.shape[0] * ho * wo, out=out)


def sq_weight_grad(x: Tensor, y: Tensor, geom: ConvGeometry, out: Tensor | None = None) -> Tensor:
    """d E[y_c^2] / d w_c = conv2d_weight(x, 2 y / M): one weight-gradient convolution.

    Computed in the conv's own compute dtype (fp16/bf16 under autocast, where x may still be fp32:
    the low-precision convolution is the fast one on GPU) and returned in the statistics dtype of y
    (into ``out`` if given).
    """
    m = y.shape[0] * y.shape[2] * y.shape[3]
    # Both operands are scaled by sqrt(2/M) before the convolution, not the result by 2/M after it:
    # unscaled, the convolution's output is a sum of x*y over M = N*H*W positions, M E[x y], which
    # for a stem on 2 x 800 x 800 images (M = 320k) exceeds fp16's 65504 as soon as E[x y] > 0.2.
    # Scaled, the output is 2 E[x y] itself, O(1)-O(1e4) for O(1)-O(100) activations, and each
    # operand (sqrt(2/M), 1e-3 to 1e-2 at detection sizes, times an activation) stays in fp16's
    # normal range (> 6e-5), so nothing overflows or flushes to zero; scaling costs one rounding.
    scale = math.sqrt(2.0 / m)
    with torch.no_grad():
        grad = torch.nn.grad.conv2d_weight(
            (x.detach() * scale).to(y.dtype), geom.weight_shape, y.detach() * scale,
            geom.stride, geom.padding, geom.dilation, geom.groups,
        )
    if out is None:
        return grad.to(statistics_dtype(y.dtype))
    return out.copy_(grad)


def taylor_deltas(
    w_now: Tensor, hist_weight: Tensor, hist_patch: Tensor, hist_dsq: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """First-order change of the stored (mean, E[y^2]) when the weight moved from stored to now.

    The mean derivative is stored once per input channel (it is the same for every output channel
    of a group), so its contraction goes group by group; the E[y^2] one is a plain dot product.
    Returns two (n, C) tensors, in the history's dtype.
    """
    n, c = hist_weight.shape[:2]
    dw = w_now.to(hist_weight.dtype).unsqueeze(0) - hist_weight  # (n, C, Cin_g, kh, kw)
    k = dw[0, 0].numel()
    delta_mean = torch.einsum(
        "ngok,ngk->ngo", dw.reshape(n, groups, c // groups, k), hist_patch.reshape(n, groups, k)
    ).reshape(n, c)
    delta_sq = torch.linalg.vecdot(dw.reshape(n, c, k), hist_dsq.reshape(n, c, k))
    return delta_mean, delta_sq


def cbn_window_forward(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    rho: float,
    hist_mean: Tensor,
    hist_sq: Tensor,
    valid: Tensor,
    taylor: TaylorInputs | None,
) -> WindowResult:
    """Normalize y with the statistics of the current batch plus the compensated stored batches.

    Gradient flows only through the current batch's statistics; the stored ones and the Taylor
    term are constants. Statistics are formed in ``statistics_dtype(y.dtype)`` (the history's
    dtype); the output has y's dtype. The variance of the union is formed as the mean over kept
    entries of ``var_s + (mean_s - mean)^2``, which equals ``E[y^2] - mean^2`` of the averaged moments exactly
    but does not cancel catastrophically when |mean| >> std (it also makes window 1 equal BN).
    The current batch is always kept: its variance is non-negative by construction, so only
    round-off could flag it, and dropping it would leave a channel with nothing to average.
    History tensors always have every slot, ``valid`` (S,) saying which hold data: fixed shapes
    let one compiled graph serve the whole run instead of one per window fill level.
    """
    yf = y.to(statistics_dtype(y.dtype))
    cur_var, cur_mean = torch.var_mean(yf, dim=(0, 2, 3), correction=0)
    if taylor is None:
        delta_mean = torch.zeros_like(hist_mean)
        comp_mean, comp_sq = hist_mean, hist_sq
    else:
        d_mean, d_sq = taylor_deltas(*taylor)
        delta_mean = rho * d_mean
        comp_mean = hist_mean + delta_mean
        comp_sq = hist_sq + rho * d_sq
    comp_var = comp_sq - comp_mean.square()
    keep = (comp_var >= 0) & valid[:, None]
    count = keep.sum(0, dtype=yf.dtype) + 1.0
    # where(), not a multiply by the mask: an empty or diverged slot may hold inf/NaN. Masked before
    # it meets ``mean`` too: where()'s zero gradient times an infinite (comp_mean - mean) would
    # still be NaN in the input gradient.
    kept_mean = torch.where(keep, comp_mean, 0.0)
    mean = (cur_mean + kept_mean.sum(0)) / count
    spread = cur_var + (cur_mean - mean).square()
    var = (spread + torch.where(keep, comp_var + (kept_mean - mean).square(), 0.0).sum(0)) / count
    scale = weight * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    out = (yf * scale[None, :, None, None] + shift[None, :, None, None]).to(y.dtype)
    return WindowResult(out, cur_mean.detach(), cur_var.detach(), count, keep, comp_mean, delta_mean)
