"""Batch Renormalization (Ioffe, NeurIPS 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cbn_detect.norm.dtypes import statistics_dtype
from cbn_detect.runtime.errors import ConfigError


class BatchRenorm2d(nn.BatchNorm2d):
    """BatchNorm that corrects the batch statistics towards the running ones by (r, d).

    Use it when batches are small or not i.i.d. and training should see the same normalization as
    inference. ``r = clip(std_B / std_run, 1/r_max, r_max)`` and ``d = clip((mean_B - mean_run) /
    std_run, -d_max, d_max)`` are constants for the gradient. The clipping limits ramp linearly
    from (1, 0) - plain BN - at step ``ramp_start`` to (``r_max``, ``d_max``) at ``ramp_end``: the
    running statistics are meaningless at first. The paper ramps over 5k-40k steps of ImageNet
    training; the defaults here are scaled to detection schedules of ~10k iterations. The step
    counter is ``num_batches_tracked`` (in ``state_dict``). The paper's update rate is small
    (``momentum`` 0.01) so that the running statistics are a smooth target.
    Batch statistics are computed in ``statistics_dtype`` of the input (fp32 for fp16/bf16, fp64
    for fp64); the output has the input's dtype.
    The caller must guarantee one training forward per optimizer step (the ramp counts forwards).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        r_max: float = 3.0,
        d_max: float = 5.0,
        ramp_start: int = 1000,
        ramp_end: int = 5000,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        if r_max < 1 or d_max < 0 or not 0 <= ramp_start < ramp_end:
            raise ConfigError(
                "BRN needs norm.r_max >= 1, norm.d_max >= 0 and 0 <= norm.ramp_start < norm.ramp_end, got "
                f"r_max={r_max}, d_max={d_max}, ramp_start={ramp_start}, ramp_end={ramp_end}"
            )
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.ramp_start, self.ramp_end = int(ramp_start), int(ramp_end)

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) at the current step, as device tensors so reading them never syncs."""
        progress = (self.num_batches_tracked.float() - self.ramp_start) / (self.ramp_end - self.ramp_start)
        progress = progress.clamp(0.0, 1.0)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    @torch.no_grad()
    def renorm_correction(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """(r, d) for batch statistics (mean, std) at the current step: clipped, and outside the
        autograd graph (the method treats them as constants)."""
        r_max, d_max = self.current_limits()
        std_run = torch.sqrt(self.running_var + self.eps)
        r = torch.minimum(torch.maximum(std / std_run, 1.0 / r_max), r_max)
        d = torch.minimum(torch.maximum((mean - self.running_mean) / std_run, -d_max), d_max)
        return r, d

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        xf = x.to(statistics_dtype(x.dtype))
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        std = torch.sqrt(var + self.eps)
        r, d = self.renorm_correction(mean, std)
        self._update_running_stats(mean, var, x)
        scale = self.weight * r / std
        shift = self.bias + self.weight * (d - mean * r / std)
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, x: Tensor) -> None:
        """As BatchNorm2d (unbiased variance), into buffers of their own dtype."""
        m = x.numel() // x.shape[1]
        dtype = self.running_mean.dtype
        self.running_mean.lerp_(mean.to(dtype), self.momentum)
        self.running_var.lerp_((var * (m / max(m - 1, 1))).to(dtype), self.momentum)
        self.num_batches_tracked.add_(1)
