"""Norms across 2 CPU (gloo) processes: SyncBN equals BN on the joint batch; CBN under DDP keeps
its history per process. One spawn serves both checks (starting processes is the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cbn_detect.norm import SyncBatchNorm2d, convert_norm

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
        results.append({
            "out": out.detach(), "x_grad": x.grad, "w_grad": norm.weight.grad.clone(),
            "b_grad": norm.bias.grad.clone(), "running_mean": norm.running_mean.clone(),
            "running_var": norm.running_var.clone(),
        })
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


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        syncbn = _run(_init(SyncBatchNorm2d(3, momentum=0.3)), slice(2 * rank, 2 * rank + 2))
        torch.save({"syncbn": syncbn, "cbn": _cbn_under_ddp(rank)}, Path(out_dir) / f"{rank}.pt")
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
