"""Norms across 2 CPU (gloo) processes: SyncBN equals BN on the joint batch (also for shards of
different sizes, and with exact float64 gradients); CBN under DDP keeps its history per process.
One spawn serves every check (starting processes is the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cbn_detect.norm import SyncBatchNorm2d, convert_norm, use_native_sync_batchnorm

STEPS = 2


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 5, 5, generator=g) * 3 + 1, torch.randn(4, 3, 5, 5, generator=g)


def _init(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    return norm


def _run(norm: nn.Module, rows: slice) -> list[dict[str, torch.Tensor]]:
    results = []
    for step in range(STEPS):
        x_full, g_full = _data(step)
        x = x_full[rows].clone().requires_grad_()
        out = norm(x)
        (out * g_full[rows]).sum().backward()
        results.append(
            {
                "out": out.detach(),
                "x_grad": x.grad,
                "w_grad": norm.weight.grad.clone(),
                "b_grad": norm.bias.grad.clone(),
                "running_mean": norm.running_mean.clone(),
                "running_var": norm.running_var.clone(),
            }
        )
        norm.zero_grad()
    return results


def _cbn_under_ddp(rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    model = DistributedDataParallel(convert_norm(model, "cbn", window=3, burnin=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each process sees its own data
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    norm = model.module[1]
    history_mean = norm.get_extra_state()["history"]["mean"]
    return {"history_mean": history_mean, "conv": model.module[0].weight.detach()}


# Shards of different batch and spatial sizes, as a detector's ranks pad to their own largest image.
UNEQUAL_SHAPES = ((3, 3, 5, 7), (1, 3, 4, 6))


def _unequal_shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    shape = UNEQUAL_SHAPES[rank]
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5, torch.randn(
        shape, generator=g, dtype=torch.float64
    )


def _syncbn_on_unequal_shards(rank: int) -> dict[str, torch.Tensor]:
    x, g = _unequal_shard(rank)
    x.requires_grad_()
    norm = _init(SyncBatchNorm2d(3, momentum=1.0)).double()  # momentum 1: running stats = this batch's
    out = norm(x)
    (out * g).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "w_grad": norm.weight.grad,
        "b_grad": norm.bias.grad,
        "running_mean": norm.running_mean,
        "running_var": norm.running_var,
    }


def _directional_derivatives(rank: int, directions: int = 4, eps: float = 1e-6) -> list[tuple[float, float]]:
    """(analytical, numerical) derivative of L = sum over ranks of <u_r, SyncBN(x_r)> along random
    directions v_r, in float64. Both ranks move their input at once, so the numerical side sees
    the joint function, cross-rank terms included; the analytical side is <dL/dx_r, v_r> summed
    over ranks, which is what the all-reduce in the backward must deliver."""
    x, u = _unequal_shard(rank)
    norm = _init(SyncBatchNorm2d(3, momentum=0.0)).double()
    pairs = []
    for k in range(directions):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 * k + rank), dtype=torch.float64)
        xr = x.clone().requires_grad_()
        (norm(xr) * u).sum().backward()
        analytical = (xr.grad * v).sum().reshape(1)
        with torch.no_grad():
            plus = (norm(x + eps * v) * u).sum().reshape(1)
            minus = (norm(x - eps * v) * u).sum().reshape(1)
        for value in (analytical, plus, minus):
            dist.all_reduce(value)
        pairs.append((analytical.item(), ((plus - minus) / (2 * eps)).item()))
    return pairs


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        syncbn = _run(_init(SyncBatchNorm2d(3, momentum=0.3)), slice(2 * rank, 2 * rank + 2))
        torch.save(
            {
                "syncbn": syncbn,
                "cbn": _cbn_under_ddp(rank),
                "unequal": _syncbn_on_unequal_shards(rank),
                "gradcheck": _directional_derivatives(rank),
            },
            Path(out_dir) / f"{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"{r}.pt") for r in range(2)]


def test_syncbn_on_two_cpu_processes_equals_bn_on_the_joint_batch(ranks):
    reference = _run(_init(nn.BatchNorm2d(3, momentum=0.3)), slice(0, 4))
    for step, ref in enumerate(reference):
        got = [r["syncbn"][step] for r in ranks]
        for key in ("out", "x_grad"):
            torch.testing.assert_close(torch.cat([g[key] for g in got]), ref[key], atol=1e-5, rtol=1e-5)
        for key in ("w_grad", "b_grad"):  # each rank holds its share; DDP would sum (then average)
            torch.testing.assert_close(got[0][key] + got[1][key], ref[key], atol=1e-4, rtol=1e-5)
        for key in ("running_mean", "running_var"):
            for g in got:
                torch.testing.assert_close(g[key], ref[key], atol=1e-6, rtol=1e-6)


def test_syncbn_on_shards_of_different_sizes_equals_bn_on_the_joint_batch(ranks):
    """The reference pools every value of both shards per channel (another way than the layer's
    sums and counts) and differentiates it with autograd in one process."""
    shards = [_unequal_shard(rank) for rank in range(2)]
    xs = [x.clone().requires_grad_() for x, _ in shards]
    affine = _init(nn.BatchNorm2d(3)).double()  # the layers' float32 affine values, made float64
    weight, bias = (p.detach().clone().requires_grad_() for p in (affine.weight, affine.bias))
    values = torch.cat([x.transpose(0, 1).reshape(3, -1) for x in xs], dim=1)  # (C, all values)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    outs = [
        (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * weight[:, None, None] + bias[:, None, None]
        for x in xs
    ]
    sum((out * g).sum() for out, (_, g) in zip(outs, shards)).backward()
    n = values.shape[1]
    assert n == 3 * 5 * 7 + 1 * 4 * 6  # not 2 x either shard: counts are summed, not assumed equal
    for rank, got in enumerate(r["unequal"] for r in ranks):
        torch.testing.assert_close(got["out"], outs[rank].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["x_grad"], xs[rank].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["running_mean"], mean.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["running_var"], var.detach() * n / (n - 1), rtol=1e-12, atol=1e-12)
    # each rank holds its shard's part of the affine gradients; DDP's all-reduce adds them
    torch.testing.assert_close(ranks[0]["unequal"]["w_grad"] + ranks[1]["unequal"]["w_grad"], weight.grad)
    torch.testing.assert_close(ranks[0]["unequal"]["b_grad"] + ranks[1]["unequal"]["b_grad"], bias.grad)


def test_syncbn_gradients_across_two_processes_pass_a_float64_gradient_check(ranks):
    pairs = ranks[0]["gradcheck"]
    assert pairs == ranks[1]["gradcheck"]  # both ranks reduced the same numbers
    for analytical, numerical in pairs:
        assert abs(analytical) > 1e-3  # a direction that actually moves the loss
        assert analytical == pytest.approx(numerical, rel=1e-6, abs=1e-8)


def test_cbn_under_ddp_keeps_a_history_per_process(ranks):
    a, b = (r["cbn"] for r in ranks)
    assert torch.equal(a["conv"], b["conv"])  # DDP kept the weights in step
    # ...but not the statistics' history: every slot is the process's own (DDP broadcasts buffers
    # from rank 0 before each forward, which would have made the older slots equal).
    assert (a["history_mean"] != b["history_mean"]).any(dim=1).all()
    assert torch.isfinite(a["history_mean"]).all() and a["history_mean"].abs().sum() > 0


def test_syncbn_in_one_process_is_exactly_bn_with_and_without_a_gloo_group(tmp_path):
    reference = _run(_init(nn.BatchNorm2d(3, momentum=0.3)), slice(0, 4))
    alone = _run(_init(SyncBatchNorm2d(3, momentum=0.3)), slice(0, 4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        in_group = _run(_init(SyncBatchNorm2d(3, momentum=0.3)), slice(0, 4))
    finally:
        dist.destroy_process_group()
    for ref, a, b in zip(reference, alone, in_group):
        for key in ref:
            assert torch.equal(a[key], ref[key]) and torch.equal(b[key], ref[key]), key


def test_cuda_models_swap_to_torchs_sync_batchnorm_with_the_same_state():
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), _init(SyncBatchNorm2d(3, momentum=0.3)), nn.Sequential(SyncBatchNorm2d(3))
    )
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    swapped = use_native_sync_batchnorm(model)
    assert swapped is model
    layers = [m for m in model.modules() if isinstance(m, (SyncBatchNorm2d, nn.SyncBatchNorm))]
    assert len(layers) == 2 and all(type(m) is nn.SyncBatchNorm for m in layers)
    assert not model[1].training  # the mode carries over
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(x), expected)
