"""Precision of the batch-statistics norms: float64 end to end, exact gradients, fp16 at detection
sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbn_detect.norm import BatchRenorm2d, convert_norm, norm_diagnostics
from cbn_detect.norm.cbn_math import TaylorInputs, cbn_window_forward, conv_geometry, sq_weight_grad, taylor_products
from cbn_detect.norm.dtypes import statistics_dtype

F64 = torch.float64


def conv_bn(cin: int = 3, cout: int = 6) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


def sgd_steps(model: nn.Module, xs: list[torch.Tensor], lr: float = 0.1) -> list[torch.Tensor]:
    """One training step per batch; returns the outputs (detached)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for x in xs:
        out = model(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32), (F64, F64)],
)
def test_statistics_dtype_is_at_least_fp32_and_keeps_fp64(dtype, expected):
    assert statistics_dtype(dtype) == expected


def test_cbn_window_forward_gradcheck_with_taylor_compensation():
    """Gradient flows through the current batch only: the stored statistics and the Taylor term
    are constants, and autograd's gradient w.r.t. (y, weight, bias) is the exact one for that."""
    g = torch.Generator().manual_seed(0)
    slots, c, cin = 3, 3, 2

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    y = (rand(2, c, 3, 3) * 1.5 + 0.3).requires_grad_()
    weight = (rand(c) * 0.2 + 1.0).requires_grad_()
    bias = rand(c).requires_grad_()
    hist_mean = rand(slots, c)
    hist_sq = hist_mean.square() + 1.0 + rand(slots, c).abs()  # stored variances in [1, ~3]
    w_now = rand(c, cin, 3, 3)
    hist_weight = w_now - 0.01 * rand(slots, c, cin, 3, 3)  # the conv moved since: non-zero Taylor term
    patch, dsq = rand(slots, cin, 3, 3), rand(slots, c, cin, 3, 3)
    offset = torch.stack(
        [taylor_products(hist_weight[s], patch[s : s + 1], dsq[s : s + 1], 1)[0] for s in range(slots)]
    )
    taylor = TaylorInputs(w_now, patch, dsq, offset, 1)
    valid = torch.tensor([True, True, False])

    def out(y, weight, bias):
        return cbn_window_forward(y, weight, bias, 1e-5, 1.0, hist_mean, hist_sq, valid, taylor).out

    res = cbn_window_forward(y, weight, bias, 1e-5, 1.0, hist_mean, hist_sq, valid, taylor)
    assert res.keep[valid].all() and res.count.tolist() == [3.0] * c  # nothing dropped
    assert res.delta_mean[valid].abs().min() > 1e-3  # the compensation is really there
    assert res.out.dtype == F64
    assert torch.autograd.gradcheck(out, (y, weight, bias))


def test_cbn_float64_model_trains_and_matches_float32():
    """model.double() once crashed in running_mean.lerp_ (fp32 statistics into fp64 buffers)."""
    torch.manual_seed(0)
    ref = convert_norm(nn.Sequential(conv_bn(3, 6), nn.ReLU(), conv_bn(6, 4)), "cbn", window=3, burnin=1)
    model = convert_norm(nn.Sequential(conv_bn(3, 6), nn.ReLU(), conv_bn(6, 4)), "cbn", window=3, burnin=1)
    model.load_state_dict(ref.state_dict())
    model.double()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(5)]
    outs64 = sgd_steps(model, [x.double() for x in xs])
    outs32 = sgd_steps(ref, xs)
    for norm in (model[0][1], model[2][1]):
        assert norm.last_window.count.min() == 3  # burn-in done, window filled
        assert all(v.dtype == F64 for v in norm.get_extra_state()["history"].values())
        assert norm.running_mean.dtype == F64
    for o64, o32 in zip(outs64, outs32):
        assert o64.dtype == F64 and torch.isfinite(o64).all()
        torch.testing.assert_close(o64.float(), o32, atol=1e-5, rtol=1e-4)


def test_cbn_float64_checkpoint_resumes_in_float64():
    """A freshly built layer holds an fp32 history; loading must not round the saved fp64 one."""

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        return convert_norm(conv_bn(), "cbn", window=3, burnin=0).double()

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 8, 8, generator=g, dtype=F64) for _ in range(4)]
    a = make()
    sgd_steps(a, xs[:2])
    b = make()
    b.load_state_dict(a.state_dict())
    saved, loaded = a[1].get_extra_state()["history"], b[1].get_extra_state()["history"]
    assert all(loaded[k].dtype == F64 and torch.equal(loaded[k], saved[k]) for k in saved)
    for x in xs[2:]:
        assert torch.equal(a(x), b(x))


def far_off_brn() -> BatchRenorm2d:
    """BRN past its ramp whose running statistics are far from any unit-scale batch, frozen."""
    brn = BatchRenorm2d(2, momentum=0.0, r_max=2.0, d_max=0.5, ramp_start=0, ramp_end=2).double()
    brn.num_batches_tracked.fill_(10)  # well past ramp_end: limits stay put across forwards
    brn.running_mean.copy_(torch.tensor([200.0, -20.0]))
    brn.running_var.copy_(torch.tensor([1e4, 1e-4]))  # batch std << run std, then >> run std
    return brn


def test_brn_gradcheck_where_r_and_d_are_clipped():
    """r and d are constants for the gradient; finite differences agree only where they are
    locally constant, i.e. clipped at their limits."""
    brn = far_off_brn()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, 3, generator=g, dtype=F64).requires_grad_()
    weight = (brn.weight.detach() + 0.1 * torch.randn(2, generator=g, dtype=F64)).requires_grad_()
    bias = torch.randn(2, generator=g, dtype=F64).requires_grad_()

    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    r, d = brn.renorm_correction(mean, torch.sqrt(var + brn.eps))
    assert r.tolist() == [0.5, 2.0] and d.tolist() == [-0.5, 0.5]

    def out(x, weight, bias):
        return torch.func.functional_call(brn, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(out, (x, weight, bias))
    assert brn.running_mean.tolist() == [200.0, -20.0]  # momentum 0: gradcheck's forwards moved nothing


def test_brn_gradient_treats_unclipped_r_and_d_as_constants():
    brn = BatchRenorm2d(2, momentum=0.0, ramp_start=0, ramp_end=2).double()
    brn.num_batches_tracked.fill_(10)
    brn.running_mean.copy_(torch.tensor([0.3, -0.2]))
    brn.running_var.copy_(torch.tensor([1.5, 0.7]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    upstream = torch.randn(x.shape, generator=g, dtype=F64)

    def input_grad(forward) -> torch.Tensor:
        xi = x.clone().requires_grad_()
        (forward(xi) * upstream).sum().backward()
        return xi.grad

    def formula(detach: bool):
        def forward(xi):
            var, mean = torch.var_mean(xi, dim=(0, 2, 3), correction=0)
            std = torch.sqrt(var + brn.eps)[None, :, None, None]
            mean = mean[None, :, None, None]
            std_run = torch.sqrt(brn.running_var + brn.eps)[None, :, None, None]
            r, d = std / std_run, (mean - brn.running_mean[None, :, None, None]) / std_run
            if detach:
                r, d = r.detach(), d.detach()
            return (xi - mean) / std * r + d

        return forward

    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    r, d = brn.renorm_correction(mean, torch.sqrt(var + brn.eps))
    assert (0.5 < r).all() and (r < 2.0).all() and (d.abs() < 1.0).all()  # far from limits 3 and 5
    grad = input_grad(brn)
    torch.testing.assert_close(grad, input_grad(formula(detach=True)))
    assert (grad - input_grad(formula(detach=False))).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
@pytest.mark.parametrize("name", ["brn", "cbn", "cbn_naive"])
def test_bn_like_layers_run_in_the_model_dtype(name, dtype):
    """model.double() (and a bf16 model) once crashed in running_mean.lerp_."""
    torch.manual_seed(0)
    options = {"ramp_start": 0, "ramp_end": 1} if name == "brn" else {"window": 2, "burnin": 0}
    model = convert_norm(conv_bn(), name, **options).to(dtype)
    x = torch.randn(2, 3, 5, 5, dtype=dtype, requires_grad=True)
    for _ in range(2):
        out = model(x)
        out.float().square().mean().backward()
        assert out.dtype == dtype and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert model[1].running_var.dtype == dtype and torch.isfinite(model[1].running_var).all()
    if name != "brn":
        history = model[1].get_extra_state()["history"]
        assert all(v.dtype == statistics_dtype(dtype) for v in history.values())


def test_fp16_autocast_stem_at_detection_size_stores_finite_derivatives():
    """A 7x7/2 stem on 2 x 800 x 800 images: d E[y^2]/dW sums 320k products of O(1) values, which
    overflows fp16 unless the operands are scaled before the convolution (it once held thousands
    of infinities and every stored entry was dropped). CPU fp16 convolutions are slow, hence the
    fewest steps that fill the window."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    model = convert_norm(nn.Sequential(conv, nn.BatchNorm2d(64)), "cbn", window=4, burnin=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 800, 800, generator=torch.Generator().manual_seed(0)) * 2 + 0.5

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return model(x)

    out = forward()
    for _ in range(3):  # three stored entries, then a forward that averages all of them
        out[:, :, :200].float().square().mean().backward()  # not scale-invariant: weights move
        opt.step()
        opt.zero_grad()
        out = forward()
    norm = model[1]
    history = norm.get_extra_state()["history"]
    assert all(torch.isfinite(v).all() for v in history.values())
    assert norm.last_window.count.tolist() == [4.0] * 64
    diag = norm_diagnostics(model)
    assert diag["norm/1/dropped"] == 0 and diag["norm/1/taylor_rel"] > 0
    # Nothing flushed to zero either: the latest entry (slot 0) agrees with fp32 arithmetic.
    with torch.no_grad():
        exact = sq_weight_grad(x, conv(x), conv_geometry(conv))
    torch.testing.assert_close(history["dsq"][0], exact, rtol=0, atol=1e-2 * exact.abs().max().item())


def test_cbn_history_holds_no_weight_copies():
    """Per slot a CBN layer keeps one weight-shaped tensor (d E[y^2]/dW), the per-input-channel
    patch mean and a few per-channel numbers: no copy of the conv's weight (issue 16)."""
    window, cin, cout = 4, 16, 32
    model = convert_norm(conv_bn(cin, cout), "cbn", window=window, burnin=0)
    model(torch.randn(2, cin, 8, 8))
    norm = model[1]
    weight = model[0].weight
    per_slot = weight.numel() + cin * 9 + 8 * cout  # dsq + patch + at most 8 statistic rows
    assert norm.history_bytes() <= (window - 1) * per_slot * 4
    assert norm.history_bytes() < 2 * (window - 1) * weight.numel() * 4  # a weight copy would double it
    assert "weight" not in norm.get_extra_state()["history"]


def test_subtraction_form_of_taylor_term_loses_about_one_digit_in_fp32():
    """``W_t.g - W_s.g`` (what the stored per-channel offsets allow) against ``(W_t - W_s).g`` in
    fp64, for a conv that moved by 1e-3 of its weights. Measured: the fp32 error is ~5e-8 of
    sum |W| |g| (a few roundings of the large products, as cbn_math's docstring states), and the
    median relative error of the term is ~2e-4, against ~3e-5 for the difference form that needs
    the weight copies: about one digit lost, three to four kept. The bounds leave 5-20x margin."""
    g = torch.Generator().manual_seed(0)
    c, cin = 64, 64
    w_s = torch.randn(c, cin, 3, 3, generator=g, dtype=F64)
    w_t = w_s + 1e-3 * torch.randn(c, cin, 3, 3, generator=g, dtype=F64)
    patch = torch.randn(1, cin, 3, 3, generator=g, dtype=F64).abs() + 0.5  # post-ReLU means: one sign
    dsq = torch.randn(1, c, cin, 3, 3, generator=g, dtype=F64).abs() + 0.5
    exact = taylor_products(w_t - w_s, patch, dsq, 1)[0]  # (2, C)
    magnitude = taylor_products(w_t.abs(), patch, dsq, 1)[0]  # sum |W| |g|: the products' size
    f32 = [t.float() for t in (w_t, w_s, patch, dsq)]
    sub = taylor_products(f32[0], f32[2], f32[3], 1)[0] - taylor_products(f32[1], f32[2], f32[3], 1)[0]
    diff = taylor_products(f32[0] - f32[1], f32[2], f32[3], 1)[0]
    error = (sub.double() - exact).abs()
    assert (error / magnitude).max() < 1e-6
    assert (error / exact.abs()).median() < 2e-3
    assert ((diff.double() - exact).abs() / exact.abs()).median() < 2e-4  # the reference form, for scale


@pytest.mark.parametrize(("bias", "groups"), [(False, 1), (True, 1), (True, 2)])
def test_stored_offsets_equal_the_contraction_with_the_weight_of_then(bias, groups):
    """The per-channel offsets a CBN entry stores in closed form (from E[y] and E[y^2] of the conv's
    own output) are ``W_s . patch_s`` and ``W_s . dsq_s`` computed by contraction in float64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=bias, groups=groups).double()
    model = convert_norm(nn.Sequential(conv, nn.BatchNorm2d(6).double()), "cbn", window=3, burnin=0)
    model(torch.randn(3, 4, 9, 9, dtype=F64) + 0.5)
    history = model[1].get_extra_state()["history"]
    offsets = taylor_products(conv.weight.detach(), history["patch"][:1], history["dsq"][:1], groups)[0]
    torch.testing.assert_close(history["wpatch"][0], offsets[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(history["wdsq"][0], offsets[1], rtol=1e-10, atol=1e-12)


def test_under_bf16_autocast_offsets_are_contracted_with_the_fp32_weight():
    """Under autocast the conv ran on bf16 copies, so ``E[y]`` is not ``W . patch`` to fp32
    precision: the stored offsets are the contraction with the fp32 weight (what the Taylor term's
    ``W_t . g`` is formed with), so the term of an unmoved conv is rounding of fp32, not of bf16."""
    torch.manual_seed(0)
    model = convert_norm(conv_bn(8, 8), "cbn", window=3, burnin=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8, 12, 12) + 0.5)
    history = model[1].get_extra_state()["history"]
    offsets = taylor_products(model[0].weight.detach(), history["patch"][:1], history["dsq"][:1], 1)[0]
    torch.testing.assert_close(history["wpatch"][0], offsets[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(history["wdsq"][0], offsets[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(history["wdsq"][0], 2 * history["sq"][0], rtol=1e-6, atol=1e-6)  # bf16 differs
