"""Batch Renormalization: BN before its ramp, clipped (r, d) correction after it."""

from __future__ import annotations

import torch
from torch import nn

from cbn_detect.norm import BatchRenorm2d


def test_before_the_ramp_it_is_batchnorm():
    torch.manual_seed(0)
    brn, bn = BatchRenorm2d(4, momentum=0.1, ramp_start=5, ramp_end=10), nn.BatchNorm2d(4)
    for _ in range(3):
        x = torch.randn(2, 4, 3, 3) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = brn(xa), bn(xb)
        torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-4)
        out_a.sum().backward()
        out_b.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(brn.running_var, bn.running_var)


def test_after_the_ramp_it_corrects_towards_running_statistics_within_limits():
    brn = BatchRenorm2d(2, r_max=2.0, d_max=0.5, ramp_start=0, ramp_end=4)
    brn.num_batches_tracked.fill_(4)
    brn.running_mean.copy_(torch.tensor([0.0, 10.0]))
    brn.running_var.copy_(torch.tensor([1.0, 1.0]))
    x = torch.randn(8, 2, 4, 4) * torch.tensor([1.5, 0.1]).view(1, 2, 1, 1)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    std, std_run = torch.sqrt(var + brn.eps), torch.sqrt(torch.ones(2) + brn.eps)
    r = (std / std_run).clamp(0.5, 2.0)
    d = ((mean - torch.tensor([0.0, 10.0])) / std_run).clamp(-0.5, 0.5)
    expected = (x - mean.view(1, 2, 1, 1)) / std.view(1, 2, 1, 1) * r.view(1, 2, 1, 1) + d.view(1, 2, 1, 1)
    torch.testing.assert_close(brn(x), expected, atol=1e-5, rtol=1e-4)
    assert d[1] == -0.5 and r[1] == 0.5  # channel 1 is far off its running statistics: clipped
    r_max, d_max = brn.current_limits()
    assert (r_max.item(), d_max.item()) == (2.0, 0.5)
