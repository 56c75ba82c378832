"""Synchronized BatchNorm that also works across CPU (gloo) processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is again a sum: each rank's statistics feed every rank's
    output, so every rank's input gradient collects the contributions of all ranks."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all processes.

    Use it for small per-process batches when every step can afford one all-reduce per layer.
    With no process group or a world of one it is exactly ``nn.BatchNorm2d``; on CUDA with several
    processes it is ``nn.SyncBatchNorm``; on CPU with several (gloo) processes, which
    ``nn.SyncBatchNorm`` refuses, it all-reduces the batch sums itself, with exact gradients.
    The caller must guarantee that every process of the group calls every such layer in the same
    order on every training step (otherwise the all-reduces deadlock), as with ``nn.SyncBatchNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        world = _world_size(self.process_group)
        if world == 1 or not self.training:
            # nn.SyncBatchNorm would refuse CPU input whenever a group exists, even of size one.
            return nn.BatchNorm2d.forward(self, x)
        if x.device.type != "cpu":
            return super().forward(x)
        return self._cpu_sync_forward(x)

    def _cpu_sync_forward(self, x: Tensor) -> Tensor:
        """Two all-reduces (sum and count, then centred squares) to match BN's exact variance."""
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        total = _AllReduceSum.apply(local, self.process_group)
        count = total[c]
        mean = total[:c] / count
        centred = xf - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.square().sum((0, 2, 3)), self.process_group) / count
        with torch.no_grad():
            n = count.item()
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (n / max(n - 1, 1)), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)
