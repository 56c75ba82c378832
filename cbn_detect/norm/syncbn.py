"""Synchronized BatchNorm that also works across CPU (gloo) processes under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cbn_detect.norm.dtypes import statistics_dtype


def _gather_sum(local: Tensor, group, world: int) -> list[Tensor]:
    """Every rank's ``local`` (same shape on all), in rank order.

    An all-gather rather than an all-reduce: with gloo on one machine a small all-gather takes
    about half the time of an all-reduce (0.55 vs 1.2 ms measured for 65 floats between two
    processes), and SyncBN pays one per layer in each direction of every step.
    """
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    return gathered


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _SyncBatchNorm(torch.autograd.Function):
    """BatchNorm over the union of every process's batch: one all-gather forward, one backward.

    Forward gathers each rank's (count, mean, sum of squared deviations) per channel and merges them
    with the parallel-variance formula (Chan et al.), exact for shards of any size and free of the
    E[x^2] - mean^2 cancellation. Backward gathers the two per-channel sums BN's input gradient
    needs (of dy and of dy * x_hat), so each rank's input gradient is that of the sum of every
    rank's loss, as for torch's nn.SyncBatchNorm; the affine gradients stay local (DDP reduces them).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, group, world: int):
        c = x.shape[1]
        xf = x.to(statistics_dtype(x.dtype))
        local_var, local_mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        local_count = x.numel() // c
        local = torch.cat([xf.new_full((1,), local_count), local_mean, local_var * local_count])
        stats = torch.stack(_gather_sum(local, group, world))  # (world, 1 + 2C)
        counts, means, m2 = stats[:, :1], stats[:, 1 : c + 1], stats[:, c + 1 :]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (m2.sum(0) + (counts * (means - mean).square()).sum(0)) / count
        invstd = torch.rsqrt(var + eps)
        x_hat = (xf - mean[None, :, None, None]) * invstd[None, :, None, None]
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.group, ctx.world, ctx.count = group, world, count
        out = x_hat * weight.to(xf.dtype)[None, :, None, None] + bias.to(xf.dtype)[None, :, None, None]
        return out.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_out: Tensor, *unused: Tensor):
        x_hat, invstd, weight = ctx.saved_tensors
        dy = grad_out.to(x_hat.dtype)
        local_sum_dy = dy.sum((0, 2, 3))
        local_sum_dy_xhat = (dy * x_hat).sum((0, 2, 3))
        total = torch.stack(_gather_sum(torch.cat([local_sum_dy, local_sum_dy_xhat]), ctx.group, ctx.world)).sum(0)
        c = local_sum_dy.shape[0]
        mean_dy = (total[:c] / ctx.count)[None, :, None, None]
        mean_dy_xhat = (total[c:] / ctx.count)[None, :, None, None]
        scale = (weight.to(x_hat.dtype) * invstd)[None, :, None, None]
        grad_x = (scale * (dy - mean_dy - x_hat * mean_dy_xhat)).to(grad_out.dtype)
        grad_weight = local_sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = local_sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch over all processes.

    Use it for small per-process batches when every step can afford one all-reduce per layer.
    With no process group or a world of one it is exactly ``nn.BatchNorm2d``. With several
    processes it all-reduces the per-channel sums and element counts, so shards of different
    sizes (a detector pads each batch to its own largest image) still give the exact statistics
    of the joint batch, with exact gradients.

    It is deliberately *not* an ``nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses any
    module holding one on CPU ("SyncBatchNorm layers only work with GPU modules"), which would
    rule out multi-process CPU runs. On CUDA, :func:`use_native_sync_batchnorm` swaps every layer
    for torch's ``nn.SyncBatchNorm`` (its fused kernels); both keep the same ``state_dict`` keys,
    so checkpoints move freely between the two.

    The caller must guarantee that every process of the group calls every such layer in the same
    order on every training step (otherwise the all-reduces deadlock), as with ``nn.SyncBatchNorm``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, process_group=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        world = _world_size(self.process_group)
        if not self.training or world == 1:
            return super().forward(x)
        out, mean, var, count = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps, self.process_group, world)
        with torch.no_grad():
            n = count.item()
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


@torch.no_grad()
def use_native_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SyncBatchNorm2d` by an ``nn.SyncBatchNorm`` with the same state.

    For CUDA models, before the DDP wrap: torch's layer runs fused kernels, ours does the same
    arithmetic in separate ops. Returns ``module`` (changed in place; a bare layer is returned
    replaced).
    """
    if isinstance(module, SyncBatchNorm2d):
        native = nn.SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            module.process_group,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        native.load_state_dict(module.state_dict())
        native.train(module.training)
        return native
    for name, child in module.named_children():
        replaced = use_native_sync_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
