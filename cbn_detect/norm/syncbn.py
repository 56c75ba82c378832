"""Synchronized BatchNorm that also works across CPU (gloo) processes under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cbn_detect.norm.dtypes import statistics_dtype


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
        if not self.training or _world_size(self.process_group) == 1:
            return super().forward(x)
        return self._sync_forward(x)

    def _sync_forward(self, x: Tensor) -> Tensor:
        """Two all-reduces (sums and counts, then centred squares) to match BN's exact variance."""
        c = x.shape[1]
        xf = x.to(statistics_dtype(x.dtype))
        local = torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        total = _AllReduceSum.apply(local, self.process_group)
        count = total[c]
        mean = total[:c] / count
        centred = xf - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.square().sum((0, 2, 3)), self.process_group) / count
        with torch.no_grad():
            n = count.item()
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


@torch.no_grad()
def use_native_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SyncBatchNorm2d` by an ``nn.SyncBatchNorm`` with the same state.

    For CUDA models, before the DDP wrap: torch's layer runs fused kernels, ours does the same
    arithmetic in separate ops. Returns ``module`` (changed in place; a bare layer is returned
    replaced).
    """
    if isinstance(module, SyncBatchNorm2d):
        native = nn.SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            module.process_group, device=module.weight.device, dtype=module.weight.dtype,
        )
        native.load_state_dict(module.state_dict())
        native.train(module.training)
        return native
    for name, child in module.named_children():
        replaced = use_native_sync_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
