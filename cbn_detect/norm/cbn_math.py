"""The arithmetic of Cross-Iteration BatchNorm, as pure functions of tensors.

Kept apart from the module so that the same function serves as the plain-PyTorch reference (CPU,
tests) and, wrapped in ``torch.compile``, as the fused path on CUDA; and so that the tests can check
each piece (derivatives, compensation, window combination) against autograd and brute force.

Shapes: ``y`` is the norm's input (N, C, H, W), i.e. the output of the producing conv whose input
is ``x`` and weight ``w`` (C, Cin/groups, kh, kw). History tensors carry a leading slot axis
(window - 1 slots, ``valid`` marking the filled ones). Statistics, history and derivatives are in
``statistics_dtype(y.dtype)``: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 ones.

The Taylor compensation of a stored statistic s (the mean or E[y^2] of a past batch, stored with
its derivative g = ds/dW under the weight W_s of then) to the current weight W_t is
``s + (W_t - W_s) . g = s + W_t . g - W_s . g``. The stored entry keeps ``W_s . g`` (one number per
channel, known in closed form when the entry is written: ``E[y] - b`` and ``2 (E[y^2] - b E[y])``
for y = W_s * x + b, see ``CrossIterationBatchNorm2d._push``) instead of a copy of W_s, so the
history holds one weight-shaped tensor per slot (d E[y^2]/dW) and the contraction with W_t is one
batched matmul over all slots. The price is a subtraction of two nearly equal numbers: the correction carries an
absolute error of a few fp32 roundings of |W . g| (about |s|), instead of a few roundings of
|(W_t - W_s) . g| (see tests/norm/test_norm_precision.py for the measured digits).
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
    """What compensating the stored statistics to the current weight needs (see taylor_products)."""

    w_now: Tensor  # (C, Cin/groups, kh, kw) the conv's current weight
    hist_patch: Tensor  # (S, Cin, kh, kw) d mean / dW of each stored entry, per input channel
    hist_dsq: Tensor  # (S, C, Cin/groups, kh, kw) d E[y^2] / dW of each stored entry
    hist_offset: Tensor  # (S, 2, C) W_s . patch_s and W_s . dsq_s, W_s the weight when s was stored
    groups: int
    scratch: Tensor | None = None  # optional (2, C, S) contiguous buffer for W_t . (patch, dsq)


class WindowResult(NamedTuple):
    """One training step of CBN: the output plus what the module stores and reports."""

    out: Tensor  # normalized, affine-transformed input, dtype of y
    cur_mean: Tensor  # (C,) statistics dtype, this batch's mean (detached)
    cur_var: Tensor  # (C,) statistics dtype, this batch's biased variance (detached)
    count: Tensor  # (C,) entries averaged per channel, current batch included
    keep: Tensor  # (S, C) bool, stored entries that hold data and passed the variance check
    comp_mean: Tensor  # (S, C) stored means compensated to the current weight
    delta_mean: Tensor  # (S, C) the Taylor term added to the stored means (already times rho)


class RunningStats(NamedTuple):
    """BatchNorm's running buffers (in the model's dtype), updated in place with the current batch."""

    mean: Tensor
    var: Tensor
    momentum: float


class WindowInputs(NamedTuple):
    """One training step's inputs, named: the fields are ``cbn_window_forward``'s parameters, so the
    layer passes them by name, through ``torch.compile`` or not.

    ``filled`` (the number of valid slots) is not one of them: it is a hint known on the host that
    only the CPU fast path reads, and the compiled graph must not take it (an int would be a guard,
    one graph per fill level; ``valid`` expresses the fill level as data instead)."""

    y: Tensor  # (N, C, H, W) the norm's input, the output of the producing conv
    weight: Tensor  # (C,) the norm's affine weight
    bias: Tensor  # (C,) the norm's affine bias
    eps: float
    rho: float  # the Taylor term's factor: 1 compensates fully, 0 is naive CBN
    hist_mean: Tensor  # (S, C) the stored means
    hist_sq: Tensor  # (S, C) the stored E[y^2]
    valid: Tensor  # (S,) bool, the slots that hold data
    taylor: TaylorInputs | None  # None: the stored statistics are used as stored
    running: RunningStats | None = None


class _Compensated(NamedTuple):
    """The stored statistics moved to the current conv weight."""

    mean: Tensor  # (S, C)
    sq: Tensor  # (S, C)
    delta_mean: Tensor  # (S, C) the Taylor term added to the means (already times rho)


class _Moments(NamedTuple):
    """The window's statistics: what normalizes, and what is reported."""

    mean: Tensor  # (C,)
    var: Tensor  # (C,)
    count: Tensor  # (C,) entries averaged per channel, current batch included
    keep: Tensor  # (S, C) bool, the stored entries averaged
    shared_by: Tensor | float  # ``count`` as the backward divides by it: one number if equal for all


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


def mean_input_patch(x: Tensor, geom: ConvGeometry, out_hw: tuple[int, int], out: Tensor | None = None) -> Tensor:
    """d mean(y_c) / d w_c: the conv's input patch averaged over batch and output positions.

    The patch seen at kernel offset (i, j) over all outputs is a strided crop of the zero-padded
    input, and crops along rows and columns are independent, so after summing the batch away the
    whole patch is two strided window sums (``unfold``: one for the kh row offsets, one for the kw
    column offsets) instead of an unfold of the input or a weight-gradient convolution; an unpadded
    1x1 conv (most of a ResNet) needs a single strided mean.
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
    xs = x.sum(0, dtype=dtype)  # (Cin, H, W)
    if ph or pw:
        xs = F.pad(xs, (pw, pw, ph, ph))
    # Window i of unfold(dim, size, step) starts at i * step: the kernel offsets i * dh, i < kh.
    rows = xs.unfold(1, sh * (ho - 1) + 1, dh)[:, :kh, :, ::sh].sum(-1)  # (Cin, kh, Wp)
    cols = rows.unfold(2, sw * (wo - 1) + 1, dw)[:, :, :kw, ::sw].sum(-1)  # (Cin, kh, kw)
    return torch.div(cols, x.shape[0] * ho * wo, out=out)


def sq_weight_grad(
    x: Tensor, y: Tensor, geom: ConvGeometry, out: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """d E[y_c^2] / d w_c = conv2d_weight(x, 2 y / M): one weight-gradient convolution.

    Computed in the conv's own compute dtype (fp16/bf16 under autocast, where x may still be fp32:
    the low-precision convolution is the fast one on GPU) and returned in the statistics dtype of y
    (into ``out`` if given, scaled on the way: no further copy). ``weight``: the conv's weight, if
    at hand; only its shape and layout are read, but oneDNN takes a slower path (2-3x on the small
    maps of a ResNet's last stage) for a stand-in without its layout.
    """
    m = y.shape[0] * y.shape[2] * y.shape[3]
    x, y = x.detach(), y.detach()
    if y.dtype == torch.float16:
        # fp16 only (bf16, fp32 and fp64 share fp32's exponent range or more): both operands are
        # scaled by sqrt(2/M) before the convolution, not the result by 2/M after it. Unscaled, the
        # convolution's output is a sum of x*y over M = N*H*W positions, M E[x y], which for a stem
        # on 2 x 800 x 800 images (M = 320k) exceeds fp16's 65504 as soon as E[x y] > 0.2. Scaled,
        # the output is 2 E[x y] itself, O(1)-O(1e4) for O(1)-O(100) activations, and each operand
        # (sqrt(2/M), 1e-3 to 1e-2 at detection sizes, times an activation) stays in fp16's normal
        # range (> 6e-5), so nothing overflows or flushes to zero; scaling costs one rounding.
        scale = math.sqrt(2.0 / m)
        x, y, after = (x * scale).to(y.dtype), y * scale, 1.0
    else:
        x, after = x.to(y.dtype), 2.0 / m
    if weight is None or weight.dtype != y.dtype:
        weight = y.new_empty(geom.weight_shape)  # contiguous: a stride-0 one is slower still
    grad = torch.ops.aten.convolution_backward(
        y,
        x,
        weight.detach(),
        None,
        geom.stride,
        geom.padding,
        geom.dilation,
        False,
        [0],
        geom.groups,
        (False, True, False),
    )[1]
    if out is None:
        out = torch.empty(grad.shape, dtype=statistics_dtype(y.dtype), device=grad.device)
    if grad.dtype == out.dtype:
        return torch.mul(grad, after, out=out)
    return out.copy_(grad).mul_(after)  # scaled in the statistics dtype, not rounded again in fp16/bf16


def taylor_products(w: Tensor, hist_patch: Tensor, hist_dsq: Tensor, groups: int, out: Tensor | None = None) -> Tensor:
    """``W . patch_s`` and ``W . dsq_s`` for every stored slot s and channel, as an (S, 2, C) view
    of ``out`` (contiguous (2, C, S); allocated if None; for one slot, an entry's (2, C) offsets).

    Two batched matmuls over all slots at once, reading the history in place and writing their
    results in place: the mean derivative is stored once per input channel (it is the same for
    every output channel of a group), so its contraction goes group by group; the E[y^2] one is a
    row-wise dot product per channel.
    """
    s, c = hist_dsq.shape[:2]
    k = hist_dsq[0, 0].numel()
    w = w.to(hist_dsq.dtype)
    if out is None:
        out = hist_dsq.new_empty(2, c, s)
    out = out.view(2, c, s)
    patch = hist_patch.reshape(s, groups, k).permute(1, 2, 0)  # (G, K, S)
    dsq = hist_dsq.reshape(s, c, k).permute(1, 2, 0)  # (C, K, S)
    torch.bmm(w.reshape(groups, c // groups, k), patch, out=out[0].view(groups, c // groups, s))
    torch.bmm(w.reshape(c, 1, k), dsq, out=out[1].view(c, 1, s))
    return out.permute(2, 0, 1)


def update_running_stats(running: RunningStats, cur_mean: Tensor, cur_var: Tensor, m: int) -> None:
    """BatchNorm's EMA of the current batch alone, with the unbiased variance (``m`` values per
    channel; one value gives factor 1, not 1/0). The buffers keep their own dtype (the model's): a
    bf16/fp16 model's fp32 statistics are rounded into them."""
    dtype = running.mean.dtype
    running.mean.lerp_(cur_mean.detach().to(dtype), running.momentum)
    running.var.lerp_((cur_var.detach() * (m / max(m - 1, 1))).to(dtype), running.momentum)


def _masked_moments(cur_mean: Tensor, cur_var: Tensor, comp: _Compensated, valid: Tensor) -> _Moments:
    """The moments of the union of the current batch and the kept stored entries, masked per channel.

    The variance of the union is formed as the mean over kept entries of ``var_s + (mean_s - mean)^2``,
    which equals ``E[y^2] - mean^2`` of the averaged moments exactly but does not cancel
    catastrophically when |mean| >> std (it also makes window 1 equal BN). The current batch is
    always kept: its variance is non-negative by construction, so only round-off could flag it,
    and dropping it would leave a channel with nothing to average.
    """
    comp_var = torch.addcmul(comp.sq, comp.mean, comp.mean, value=-1.0)
    keep = (comp_var >= 0) & valid[:, None]
    count = keep.sum(0, dtype=cur_mean.dtype) + 1.0
    # where(), not a multiply by the mask: an empty or diverged slot may hold inf/NaN. Masked before
    # it meets ``mean`` too: where()'s zero gradient times an infinite (comp.mean - mean) would
    # still be NaN in the input gradient.
    kept_mean = torch.where(keep, comp.mean, 0.0)
    mean = (cur_mean + kept_mean.sum(0)) / count
    spread = cur_var + (cur_mean - mean).square()
    var = (spread + torch.where(keep, comp_var + (kept_mean - mean).square(), 0.0).sum(0)) / count
    return _Moments(mean, var, count, keep, count)


def _moments_all_kept(
    cur_mean: Tensor, cur_var: Tensor, comp: _Compensated, valid: Tensor, filled: int
) -> _Moments | None:
    """``_masked_moments`` when the first ``filled`` slots are the valid ones and every one passes the
    variance check (the usual case), by slicing instead of masks and with one count for all channels
    (a third of the small ops); None if an entry fails the check (or is not finite), for the masked
    form to decide per channel. The check reads the data on the host: free on CPU only."""
    keep = valid[:, None].expand(comp.mean.shape)
    if filled == 0:
        return _Moments(cur_mean, cur_var, torch.full_like(cur_mean, 1.0), keep, 1.0)
    cm, cs = comp.mean[:filled], comp.sq[:filled]
    comp_var = torch.addcmul(cs, cm, cm, value=-1.0)
    if not bool((comp_var >= 0).all()):
        return None
    count = filled + 1.0
    mean = torch.add(cur_mean, cm.sum(0)).div_(count)
    dev, cur_dev = cm - mean, cur_mean - mean
    spread = torch.addcmul(comp_var, dev, dev).sum(0)
    var = torch.addcmul(cur_var, cur_dev, cur_dev).add_(spread).div_(count)
    return _Moments(mean, var, torch.full_like(cur_mean, count), keep, count)


class _NormalizeWithWindow(torch.autograd.Function):
    """``(y - mean) / sqrt(var + eps) * weight + bias`` with (mean, var) the window's moments, in one
    native kernel forward and one (plus an in-place fix-up) backward.

    The gradient is BatchNorm's with the batch sums shared by the ``count`` entries: mean and var
    depend on y only through the current batch, d mean / d y_i = 1 / (count M) and
    d var / d y_i = 2 (y_i - mean) / (count M), so
    ``dL/dy = w r [g - sum(g) / (count M) - r^2 (y - mean) sum(g (y - mean)) / (count M)]``
    (r = 1 / sqrt(var + eps)), which is BatchNorm's backward with weight ``w / count`` plus
    ``(1 - 1 / count) w r g``. The weight and bias gradients are BatchNorm's.
    """

    @staticmethod
    def forward(
        ctx, y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, count: Tensor | float, eps: float
    ) -> Tensor:
        ctx.save_for_backward(y, weight, mean, var)
        ctx.count, ctx.eps = count, eps  # count: (C,) or one number for all channels
        return torch.native_batch_norm(y, weight, bias, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y, weight, mean, var = ctx.saved_tensors
        count = ctx.count
        invstd = torch.add(var, ctx.eps).rsqrt_()
        alone = not isinstance(count, Tensor) and count == 1.0  # the current batch only: BatchNorm's gradient
        share = count.reciprocal() if isinstance(count, Tensor) else 1.0 / count
        need_y, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out,
            y,
            weight if alone else weight * share,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [need_y, need_w, need_b],
        )
        if need_y and not alone:
            rest = torch.mul(weight, invstd).mul_(1.0 - share)
            grad_y.addcmul_(grad_out, rest.view(-1, *[1] * (y.dim() - 2)))
        return grad_y, grad_w, grad_b, None, None, None, None


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
    running: tuple[Tensor, Tensor, float] | None = None,
    filled: int | None = None,
) -> WindowResult:
    """Normalize y with the statistics of the current batch plus the compensated stored batches.

    Gradient flows only through the current batch's statistics; the stored ones and the Taylor
    term are constants. Statistics are formed in ``statistics_dtype(y.dtype)`` (the history's
    dtype); the output has y's dtype. History tensors always have every slot, ``valid`` (S,) saying
    which hold data: fixed shapes let one compiled graph serve the whole run instead of one per
    window fill level. ``running`` (running_mean, running_var, momentum), if given, is updated in
    place with the current batch alone, as BatchNorm does (``update_running_stats``). ``filled``,
    if given, is the number of valid slots (they are always the first ones), known on the host.
    The parameters are the fields of ``WindowInputs``, plus ``filled``.

    This is the one place that chooses among three paths that compute the same numbers:

    * ``_compiled_path`` while ``torch.compile`` traces this function (the layer's fused path):
      plain differentiable ops that the compiler fuses itself. The choice is made at trace time,
      so the graph holds that path alone.
    * ``_cpu_fast_path`` eagerly on CPU with ``filled`` given: reading the data on the host costs
      no device synchronisation there, so the window is combined by slicing when no entry is
      dropped.
    * ``_eager_path`` otherwise (eager on CUDA, or ``filled`` unknown): native BatchNorm kernels
      and the masked combination, which never makes the host wait for the device.
    """
    running = None if running is None else RunningStats(*running)
    inputs = WindowInputs(y, weight, bias, eps, rho, hist_mean, hist_sq, valid, taylor, running)
    if torch.compiler.is_compiling():
        return _compiled_path(inputs)
    if filled is not None and y.device.type == "cpu":
        return _cpu_fast_path(inputs, filled)
    return _eager_path(inputs)


def _compiled_path(inputs: WindowInputs) -> WindowResult:
    """The ops ``torch.compile`` traces: plain differentiable ones (no custom autograd function, no
    ``no_grad`` region, no scratch buffer kept between steps), which inductor fuses, gradients
    included, into a few kernels of its own."""
    yf = _in_statistics_dtype(inputs.y)
    cur_var, cur_mean = torch.var_mean(yf, dim=(0, 2, 3), correction=0)
    if inputs.running is not None:
        update_running_stats(inputs.running, cur_mean, cur_var, _values_per_channel(inputs.y))
    comp = _compensated_history(inputs, use_scratch=False)
    moments = _masked_moments(cur_mean, cur_var, comp, inputs.valid)
    scale = inputs.weight * torch.rsqrt(moments.var + inputs.eps)
    shift = inputs.bias - moments.mean * scale
    out = yf * scale[None, :, None, None] + shift[None, :, None, None]
    return _window_result(inputs.y, out, cur_mean.detach(), cur_var.detach(), comp, moments)


def _eager_path(inputs: WindowInputs) -> WindowResult:
    """Native BatchNorm kernels for the full-size work (the fewest passes over y) and the masked
    combination of the window, whose small ops never wait for the device."""
    yf, cur_mean, cur_var = _native_batch_statistics(inputs)
    comp = _compensated_history(inputs, use_scratch=True)
    moments = _masked_moments(cur_mean, cur_var, comp, inputs.valid)
    return _window_result(inputs.y, _native_normalize(inputs, yf, moments), cur_mean, cur_var, comp, moments)


def _cpu_fast_path(inputs: WindowInputs, filled: int) -> WindowResult:
    """``_eager_path`` with the window combined by slicing the ``filled`` first slots when every
    one is kept (the usual case, a third of the small ops); when one is dropped, the masked
    combination decides per channel as on the eager path."""
    yf, cur_mean, cur_var = _native_batch_statistics(inputs)
    comp = _compensated_history(inputs, use_scratch=True)
    moments = _moments_all_kept(cur_mean, cur_var, comp, inputs.valid, filled)
    if moments is None:
        moments = _masked_moments(cur_mean, cur_var, comp, inputs.valid)
    return _window_result(inputs.y, _native_normalize(inputs, yf, moments), cur_mean, cur_var, comp, moments)


def _in_statistics_dtype(y: Tensor) -> Tensor:
    sdtype = statistics_dtype(y.dtype)
    return y if y.dtype == sdtype else y.to(sdtype)


def _values_per_channel(y: Tensor) -> int:
    return y.numel() // y.shape[1]


def _native_batch_statistics(inputs: WindowInputs) -> tuple[Tensor, Tensor, Tensor]:
    """y in the statistics dtype, and its batch mean and biased variance by BatchNorm's own kernel.

    Without gradient: ``_NormalizeWithWindow``'s backward accounts for it. The same kernel updates
    the running buffers when they are in the statistics dtype and a channel has more than one
    value (its unbiased factor would divide by zero there); otherwise they are updated apart.
    """
    yf = _in_statistics_dtype(inputs.y)
    running, m = inputs.running, _values_per_channel(yf)
    with torch.no_grad():
        if running is not None and running.mean.dtype == running.var.dtype == yf.dtype and m > 1:
            cur_mean, cur_var = torch.batch_norm_update_stats(yf, running.mean, running.var, running.momentum)
            return yf, cur_mean, cur_var
        cur_mean, cur_var = torch.batch_norm_update_stats(yf, None, None, 0.0)
        if running is not None:
            update_running_stats(running, cur_mean, cur_var, m)
    return yf, cur_mean, cur_var


def _compensated_history(inputs: WindowInputs, use_scratch: bool) -> _Compensated:
    """The stored statistics plus rho times their Taylor term (see the module docstring), or as
    stored without Taylor inputs (naive CBN). ``use_scratch``: the contraction writes into the
    Taylor inputs' buffer (eager, no allocation a step); a traced graph allocates its own."""
    taylor = inputs.taylor
    if taylor is None:
        return _Compensated(inputs.hist_mean, inputs.hist_sq, torch.zeros_like(inputs.hist_mean))
    scratch = taylor.scratch if use_scratch else None
    now = taylor_products(taylor.w_now, taylor.hist_patch, taylor.hist_dsq, taylor.groups, out=scratch)
    delta = now - taylor.hist_offset  # (S, 2, C)
    delta_mean = delta[:, 0] if inputs.rho == 1.0 else delta[:, 0] * inputs.rho
    comp_mean = inputs.hist_mean + delta_mean
    return _Compensated(comp_mean, torch.add(inputs.hist_sq, delta[:, 1], alpha=inputs.rho), delta_mean)


def _native_normalize(inputs: WindowInputs, yf: Tensor, moments: _Moments) -> Tensor:
    """``_NormalizeWithWindow`` of y in the statistics dtype, the affine parameters cast to it."""
    weight, bias = inputs.weight, inputs.bias
    if weight.dtype != yf.dtype:
        weight, bias = weight.to(yf.dtype), bias.to(yf.dtype)
    mean, var = moments.mean, moments.var
    return _NormalizeWithWindow.apply(yf, weight, bias, mean, var, moments.shared_by, inputs.eps)


def _window_result(
    y: Tensor, out: Tensor, cur_mean: Tensor, cur_var: Tensor, comp: _Compensated, moments: _Moments
) -> WindowResult:
    if out.dtype != y.dtype:
        out = out.to(y.dtype)
    return WindowResult(out, cur_mean, cur_var, moments.count, moments.keep, comp.mean, comp.delta_mean)
