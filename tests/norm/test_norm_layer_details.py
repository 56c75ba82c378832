"""Tests that kill `make mutate`'s surviving mutants of the norm layers (SyncBN, BRN, CBN).

SyncBN's multi-rank path runs here in one process: two threads play two ranks, exchanging their
statistics through a stand-in for ``torch.distributed.all_gather`` (the real two-process runs are
in test_norm_distributed.py, whose code in child processes no mutation tool can see). References
are BatchNorm's formula on the pooled values of both shards, differentiated by autograd."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cbn_detect.norm import BatchRenorm2d, CrossIterationBatchNorm2d
from cbn_detect.norm.syncbn import SyncBatchNorm2d

F64 = torch.float64


class FakeRank:
    """A process group of one rank of a threaded two-rank world."""

    def __init__(self, rank: int, exchange: ThreadedAllGather) -> None:
        self.rank, self.exchange = rank, exchange


class ThreadedAllGather:
    """``dist.all_gather`` between threads: each deposits its tensor, all wait, all read."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)
        self.calls = 0

    def __call__(self, out: list[torch.Tensor], tensor: torch.Tensor, group: FakeRank) -> None:
        assert len(out) == self.world and all(o.shape == tensor.shape and o.dtype == tensor.dtype for o in out)
        self.slots[group.rank] = tensor.clone()
        self.barrier.wait()
        for target, source in zip(out, self.slots):
            target.copy_(source)
        self.calls += 1
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it


@pytest.fixture
def threaded_world(monkeypatch: pytest.MonkeyPatch) -> ThreadedAllGather:
    exchange = ThreadedAllGather(2)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    # the layers' group is a 2-rank subgroup of a 4-rank default world: asking the wrong group shows
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: exchange.world if isinstance(group, FakeRank) else 4)
    monkeypatch.setattr(dist, "all_gather", exchange)
    return exchange


def run_ranks(fn, world: int = 2) -> list:
    results: list = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


# Unequal shards: different batch and spatial sizes, as a detector's ranks pad their own images.
SHAPES = ((3, 2, 5, 4), (1, 2, 3, 6))
WEIGHT, BIAS = torch.tensor([1.5, -0.5], dtype=F64), torch.tensor([0.25, 2.0], dtype=F64)


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(SHAPES[rank], generator=g, dtype=F64) * torch.tensor([3.0, 0.5], dtype=F64).view(1, 2, 1, 1)
    return x + torch.tensor([1.0, -4.0], dtype=F64).view(1, 2, 1, 1), torch.randn(SHAPES[rank], generator=g, dtype=F64)


def make_syncbn(rank: int, exchange: ThreadedAllGather, momentum: float = 0.25) -> SyncBatchNorm2d:
    norm = SyncBatchNorm2d(2, eps=1e-3, momentum=momentum, process_group=FakeRank(rank, exchange)).double()
    with torch.no_grad():
        norm.weight.copy_(WEIGHT)
        norm.bias.copy_(BIAS)
        norm.running_mean.fill_(0.5)
        norm.running_var.fill_(2.0)
    return norm


def pooled_reference() -> dict[str, object]:
    """BatchNorm on every value of both shards pooled per channel, and its autograd gradients of
    L = sum over ranks of <g_r, out_r>."""
    shards = [shard(rank) for rank in range(2)]
    xs = [x.clone().requires_grad_() for x, _ in shards]
    weight, bias = WEIGHT.clone().requires_grad_(), BIAS.clone().requires_grad_()
    pooled = torch.cat([x.transpose(0, 1).reshape(2, -1) for x in xs], dim=1)  # (C, all values)
    mean = pooled.mean(1)
    var = ((pooled - mean[:, None]) ** 2).mean(1)
    outs = [
        (x - mean.view(1, 2, 1, 1)) / torch.sqrt(var.view(1, 2, 1, 1) + 1e-3) * weight.view(1, 2, 1, 1)
        + bias.view(1, 2, 1, 1)
        for x in xs
    ]
    sum((out * g).sum() for out, (_, g) in zip(outs, shards)).backward()
    n = pooled.shape[1]
    return {
        "outs": [o.detach() for o in outs],
        "x_grads": [x.grad for x in xs],
        "w_grad": weight.grad,
        "b_grad": bias.grad,
        "mean": mean.detach(),
        "var": var.detach(),
        "n": n,
    }


def test_syncbn_on_two_threaded_ranks_of_unequal_shards_is_bn_on_the_pooled_values(threaded_world) -> None:
    def rank_step(rank: int) -> dict[str, object]:
        x, g = shard(rank)
        x.requires_grad_()
        norm = make_syncbn(rank, threaded_world)
        out = norm(x)
        (out * g).sum().backward()
        return {
            "out": out.detach(),
            "x_grad": x.grad,
            "w_grad": norm.weight.grad,
            "b_grad": norm.bias.grad,
            "running_mean": norm.running_mean.clone(),
            "running_var": norm.running_var.clone(),
            "steps": int(norm.num_batches_tracked),
        }

    got = run_ranks(rank_step)
    ref = pooled_reference()
    assert ref["n"] == 3 * 5 * 4 + 1 * 3 * 6  # the shards differ: 2 x either count would be wrong
    assert threaded_world.calls == 2 * 2  # one all-gather forward and one backward per rank
    for rank in range(2):
        torch.testing.assert_close(got[rank]["out"], ref["outs"][rank], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[rank]["x_grad"], ref["x_grads"][rank], rtol=1e-10, atol=1e-12)
        # running statistics: BatchNorm's update with the pooled mean and unbiased pooled variance
        n = ref["n"]
        torch.testing.assert_close(got[rank]["running_mean"], 0.75 * 0.5 + 0.25 * ref["mean"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            got[rank]["running_var"], 0.75 * 2.0 + 0.25 * ref["var"] * n / (n - 1), rtol=1e-12, atol=1e-12
        )
        assert got[rank]["steps"] == 1
    # the affine gradients stay local to each rank (DDP sums them): their sum is the joint one
    torch.testing.assert_close(got[0]["w_grad"] + got[1]["w_grad"], ref["w_grad"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[0]["b_grad"] + got[1]["b_grad"], ref["b_grad"], rtol=1e-10, atol=1e-12)
    # ... and each is its own shard's part, not the joint sum
    x0, g0 = shard(0)
    x_hat0 = (x0 - ref["mean"].view(1, 2, 1, 1)) / torch.sqrt(ref["var"].view(1, 2, 1, 1) + 1e-3)
    torch.testing.assert_close(got[0]["b_grad"], g0.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0]["w_grad"], (g0 * x_hat0).sum((0, 2, 3)), rtol=1e-10, atol=1e-12)


def test_threaded_syncbn_without_affine_gradients_and_in_float32(threaded_world) -> None:
    """Frozen affine parameters get no gradient; a float32 input gives a float32 output computed
    in float64-accurate statistics within float32 rounding."""

    def rank_step(rank: int) -> tuple[torch.Tensor, torch.Tensor, object]:
        x, g = shard(rank)
        norm = make_syncbn(rank, threaded_world).float()
        norm.weight.requires_grad_(False)
        norm.bias.requires_grad_(False)
        xf = x.float().requires_grad_()
        out = norm(xf)
        (out * g.float()).sum().backward()
        return out.detach(), xf.grad, norm.weight.grad

    got = run_ranks(rank_step)
    ref = pooled_reference()
    for rank in range(2):
        out, grad, w_grad = got[rank]
        assert out.dtype == torch.float32 and grad.dtype == torch.float32 and w_grad is None
        torch.testing.assert_close(out.double(), ref["outs"][rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref["x_grads"][rank], rtol=1e-4, atol=1e-5)


def test_syncbn_in_eval_mode_uses_running_statistics_without_any_exchange(threaded_world) -> None:
    norm = make_syncbn(0, threaded_world).eval()
    x, _ = shard(0)
    expected = (x - 0.5) / torch.sqrt(torch.tensor(2.0 + 1e-3, dtype=F64)) * WEIGHT.view(1, 2, 1, 1) + BIAS.view(
        1, 2, 1, 1
    )
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert threaded_world.calls == 0


def test_syncbn_with_one_process_is_torchs_batchnorm() -> None:
    x, _ = shard(0)
    ours, theirs = SyncBatchNorm2d(2, momentum=0.3).double(), nn.BatchNorm2d(2, momentum=0.3).double()
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)


# --- BRN -----------------------------------------------------------------------------------------


def test_brn_clipping_limits_ramp_linearly_between_start_and_end() -> None:
    brn = BatchRenorm2d(1, r_max=3.0, d_max=5.0, ramp_start=10, ramp_end=20)
    for step, (r_max, d_max) in {
        0: (1.0, 0.0),
        10: (1.0, 0.0),
        12: (1.4, 1.0),
        15: (2.0, 2.5),
        20: (3.0, 5.0),
        99: (3.0, 5.0),
    }.items():
        brn.num_batches_tracked.fill_(step)
        got = brn.current_limits()
        assert (got[0].item(), got[1].item()) == pytest.approx((r_max, d_max), abs=1e-6), step


@pytest.mark.parametrize(
    "options",
    [
        dict(r_max=0.99),
        dict(d_max=-0.1),
        dict(ramp_start=-1),
        dict(ramp_start=5, ramp_end=5),
        dict(ramp_start=6, ramp_end=5),
    ],
)
def test_brn_refuses_limits_that_are_not_a_ramp(options: dict) -> None:
    from cbn_detect.runtime.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"^BRN needs norm.r_max >= 1, norm.d_max >= 0 and 0 <= norm.ramp_start < norm.ramp_end, got r_max=",
    ):
        BatchRenorm2d(2, **options)


def test_brn_accepts_the_edges_of_its_limits() -> None:
    brn = BatchRenorm2d(2, r_max=1.0, d_max=0.0, ramp_start=0, ramp_end=1)
    assert (brn.r_max, brn.d_max, brn.ramp_start, brn.ramp_end) == (1.0, 0.0, 0, 1)


def test_brn_after_its_ramp_in_float16_normalises_with_float32_statistics() -> None:
    """Past the ramp with running statistics equal to the batch's, r = 1 and d = 0: the output is
    BatchNorm's on the float32 values, returned in float16; running statistics as nn.BatchNorm2d."""
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 3, 3) * 3 + 1).half()
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    brn = BatchRenorm2d(2, momentum=0.5, ramp_start=0, ramp_end=1)
    brn.num_batches_tracked.fill_(5)
    brn.running_mean.copy_(mean)
    brn.running_var.copy_(var)
    out = brn(x)
    assert out.dtype == torch.float16
    expected = (xf - mean.view(1, 2, 1, 1)) / torch.sqrt(var.view(1, 2, 1, 1) + brn.eps)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(brn.running_var, var * 0.5 + var * (36 / 35) * 0.5)
    assert brn.running_mean.dtype == torch.float32 and int(brn.num_batches_tracked) == 6


# --- FrozenBN ------------------------------------------------------------------------------------


def test_frozenbn_conversion_leaves_nothing_trainable_but_the_convs_weights() -> None:
    """As convert_norm's docstring says: frozenbn freezes scale, shift and statistics (buffers, no
    gradient) at the old BN's values, and the conv stays without bias. The output is the closed
    form (conv(x) - mean) / sqrt(var + eps) * w + b with those values."""
    from cbn_detect.norm import convert_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3))
    mean, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([4.0, 0.25, 1.0])
    w, b = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.1, 0.2, -0.3])
    with torch.no_grad():
        model[1].running_mean.copy_(mean), model[1].running_var.copy_(var)
        model[1].weight.copy_(w), model[1].bias.copy_(b)
    model = convert_norm(model, "frozenbn").train()
    assert [name for name, _ in model.named_parameters()] == ["0.weight"] and model[0].bias is None
    x = torch.randn(2, 2, 5, 5)
    y = nn.functional.conv2d(x, model[0].weight)
    expected = (y - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5) * w.view(1, 3, 1, 1) + b.view(
        1, 3, 1, 1
    )
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.equal(model[1].running_mean, mean) and torch.equal(
        model[1].running_var, var
    )  # training changes nothing


# --- BRN's gradient --------------------------------------------------------------------------------


def test_brn_gradient_treats_r_and_d_as_constants() -> None:
    """Past the ramp, with running statistics away from the batch's (r and d inside their limits,
    neither 1 nor 0), the input and affine gradients are autograd's on the paper's formula
    w * (x_hat * r + d) + b with r and d computed from detached statistics - and differ from the
    gradient with r and d left in the graph, so the test can tell the two apart."""
    torch.manual_seed(1)
    x = torch.randn(4, 2, 3, 3, dtype=F64) * 2 + 0.5
    g = torch.randn(4, 2, 3, 3, dtype=F64)
    run_mean, run_var = torch.tensor([0.2, 0.9], dtype=F64), torch.tensor([3.0, 6.0], dtype=F64)
    brn = BatchRenorm2d(2, eps=1e-3, r_max=3.0, d_max=5.0, ramp_start=0, ramp_end=1).double()
    brn.num_batches_tracked.fill_(3)
    with torch.no_grad():
        brn.running_mean.copy_(run_mean), brn.running_var.copy_(run_var)
        brn.weight.copy_(torch.tensor([1.5, -0.5])), brn.bias.copy_(torch.tensor([0.1, 0.3]))
    xa = x.clone().requires_grad_()
    (brn(xa) * g).sum().backward()

    def reference(detach: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xr = x.clone().requires_grad_()
        w, b = (
            torch.tensor([1.5, -0.5], dtype=F64, requires_grad=True),
            torch.tensor([0.1, 0.3], dtype=F64, requires_grad=True),
        )
        mean = xr.mean((0, 2, 3))
        std = torch.sqrt(((xr - mean.view(1, 2, 1, 1)) ** 2).mean((0, 2, 3)) + 1e-3)
        std_run = torch.sqrt(run_var + 1e-3)
        r, d = std / std_run, (mean - run_mean) / std_run
        if detach:
            r, d = r.detach(), d.detach()
        assert ((r > 1 / 3) & (r < 3) & (d.abs() < 5)).all() and not torch.allclose(r, torch.ones_like(r))
        x_hat = (xr - mean.view(1, 2, 1, 1)) / std.view(1, 2, 1, 1)
        out = w.view(1, 2, 1, 1) * (x_hat * r.view(1, 2, 1, 1) + d.view(1, 2, 1, 1)) + b.view(1, 2, 1, 1)
        (out * g).sum().backward()
        return xr.grad, w.grad, b.grad

    x_grad, w_grad, b_grad = reference(detach=True)
    torch.testing.assert_close(xa.grad, x_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.weight.grad, w_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.bias.grad, b_grad, rtol=1e-10, atol=1e-12)
    assert (reference(detach=False)[0] - x_grad).abs().max() > 1e-2


# --- CBN against a brute-force reference -----------------------------------------------------------


def cbn_reference_step(x, weight, past, conv_kw, norm_w, norm_b, eps, rho=1.0, bias=None):
    """One CBN training forward written from the paper's definition, in float64: the current
    batch's statistics under the current conv weight W_t (differentiable), and each stored batch s
    (its conv input x_s and the weight W_s of then) compensated to W_t by a first-order Taylor
    expansion computed with autograd: stat_s(W_s) + (W_t - W_s) . d stat_s / dW at W_s, for the
    mean and for E[y^2] (constants for the gradient). Entries with a negative compensated variance
    are dropped; the window's moments are the average over the current batch and the kept entries.
    ``rho`` scales the Taylor terms (1: the paper's compensation). A conv ``bias`` is not
    compensated: a stored batch keeps the bias b_s it was computed with."""
    y = F.conv2d(x, weight, bias, **conv_kw)
    cur_mean = y.mean((0, 2, 3))
    cur_var = ((y - cur_mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    w_now = weight.detach()
    means, sqs = [], []
    for x_s, w_s, b_s in past:
        w_s = w_s.clone().requires_grad_()
        y_s = F.conv2d(x_s, w_s, b_s, **conv_kw)
        stats = (y_s.mean((0, 2, 3)), (y_s**2).mean((0, 2, 3)))
        comp = []
        for stat in stats:  # per channel c: stat_c + sum over w of (W_t - W_s) * d stat_c / dW
            rows = [torch.autograd.grad(stat[c], w_s, retain_graph=True)[0] for c in range(stat.shape[0])]
            comp.append(stat.detach() + rho * torch.stack([((w_now - w_s.detach()) * r).sum() for r in rows]))
        means.append(comp[0])
        sqs.append(comp[1])
    count = torch.ones_like(cur_mean)
    total_mean = cur_mean.clone()
    kept = []
    for m, sq in zip(means, sqs):
        keep = sq - m**2 >= 0
        kept.append((keep, m, sq - m**2))
        count = count + keep
        total_mean = total_mean + torch.where(keep, m, 0.0)
    mean = total_mean / count
    var = cur_var + (cur_mean - mean) ** 2
    for keep, m, v in kept:
        var = var + torch.where(keep, v + (m - mean) ** 2, 0.0)
    var = var / count
    out = (y - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps) * norm_w.view(
        1, -1, 1, 1
    ) + norm_b.view(1, -1, 1, 1)
    return out, cur_mean.detach(), cur_var.detach()


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled-branch"])
@pytest.mark.parametrize(
    "conv_kw, lr, rho",
    [
        (dict(padding=1), 0.5, 1.0),
        (dict(padding=1), 5.0, 1.0),
        (dict(stride=2, groups=2), 0.5, 1.0),
        (dict(padding="same", dilation=2), 0.5, 0.5),
        (dict(padding=1), 0.5, 2.0),
        (dict(padding=1, bias=True), 0.5, 1.0),
    ],
)
def test_cbn_training_equals_the_brute_force_reference_step_by_step(conv_kw, lr, rho, compiling, monkeypatch) -> None:
    """Five SGD steps of conv -> CBN (window 3, no burn-in, rho 1) in float64 against
    ``cbn_reference_step``: outputs, the conv's and the norm's gradients, the running statistics
    (BatchNorm's EMA of the current batch alone). The learning rate moves the weights enough that
    the Taylor terms matter (they move the stored means by 0.2-0.3): dropping the E[y^2] one alone
    changes the outputs by ~1e-2. At lr 0.5 every stored entry is kept (the window grows 1, 2, 3,
    3, 3); at lr 5 some compensated variances turn negative and those entries are dropped per channel.
    "compiled-branch": ``torch.compiler.is_compiling()`` made true, so ``cbn_window_forward`` runs
    the plain differentiable ops it gives ``torch.compile`` (the fused path), eagerly."""
    from cbn_detect.norm import convert_norm

    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    conv_kw = dict(conv_kw)
    use_bias = conv_kw.pop("bias", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, bias=use_bias, **conv_kw), nn.BatchNorm2d(6, eps=1e-3, momentum=0.2))
    model = convert_norm(model.double(), "cbn", window=3, burnin=0, eps=1e-3, momentum=0.2, rho=rho).double()
    weight = model[0].weight.detach().clone()
    conv_b = None
    if use_bias:
        with torch.no_grad():
            model[0].bias.copy_(torch.linspace(-1.0, 2.0, 6))
        conv_b = model[0].bias.detach().clone()
    norm_w, norm_b = torch.linspace(0.5, 1.5, 6, dtype=F64), torch.linspace(-0.2, 0.3, 6, dtype=F64)
    with torch.no_grad():
        model[1].weight.copy_(norm_w), model[1].bias.copy_(norm_b)
    running_mean, running_var = torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)
    past: list = []
    gen = torch.Generator().manual_seed(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    biggest_taylor, counts = 0.0, []
    for step in range(5):
        x = torch.randn(2, 4, 7, 7, generator=gen, dtype=F64) * (1 + 0.3 * step) + 0.5
        out = model(x)
        g = torch.randn(out.shape, generator=gen, dtype=F64)
        (out * g).mean().backward()

        w_ref = weight.clone().requires_grad_()
        nw, nb = norm_w.clone().requires_grad_(), norm_b.clone().requires_grad_()
        b_ref = None if conv_b is None else conv_b.clone().requires_grad_()
        ref, cur_mean, cur_var = cbn_reference_step(x, w_ref, past, conv_kw, nw, nb, 1e-3, rho, b_ref)
        (ref * g).mean().backward()
        torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-10, msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(model[0].weight.grad, w_ref.grad, rtol=1e-8, atol=1e-10)
        if use_bias:
            torch.testing.assert_close(model[0].bias.grad, b_ref.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(model[1].weight.grad, nw.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(model[1].bias.grad, nb.grad, rtol=1e-9, atol=1e-10)
        m = x.shape[0] * out.shape[2] * out.shape[3]
        running_mean = 0.8 * running_mean + 0.2 * cur_mean
        running_var = 0.8 * running_var + 0.2 * cur_var * m / (m - 1)
        torch.testing.assert_close(model[1].running_mean, running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[1].running_var, running_var, rtol=1e-12, atol=1e-12)
        if model[1].last_window.delta_mean.numel():
            biggest_taylor = max(biggest_taylor, float(model[1].last_window.delta_mean.abs().max()))
        counts.append(model[1].last_window.count.tolist())

        past = (past + [(x, weight.clone(), None if conv_b is None else conv_b.clone())])[-2:]
        optimizer.step()
        with torch.no_grad():
            weight -= lr * w_ref.grad
            if use_bias:
                conv_b -= lr * b_ref.grad
            norm_w -= lr * nw.grad
            norm_b -= lr * nb.grad
        torch.testing.assert_close(model[0].weight.detach(), weight, rtol=1e-9, atol=1e-11)
        optimizer.zero_grad()
    if lr == 0.5 and rho <= 1.0:
        assert counts == [[float(min(step, 2) + 1)] * 6 for step in range(5)] and biggest_taylor > 0.05
    elif lr == 5.0:
        assert min(min(c) for c in counts[1:]) < max(max(c) for c in counts[1:]) and biggest_taylor > 1e-2


# --- defaults, eval mode, low precision, edge counts -------------------------------------------------


def _conf(name: str) -> dict:
    """The ``norm`` node of ``norm=<name>`` as Hydra composes it (with what conf/norm/base/ adds)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[f"norm={name}"]).norm, resolve=True)


def test_constructor_defaults_are_the_documented_ones() -> None:
    """The defaults of the layers are the values their conf/norm files document (as composed):
    BRN's paper-scaled ramp and update rate; SyncBN's BatchNorm defaults."""
    brn, conf = BatchRenorm2d(2), _conf("brn")
    assert (brn.eps, brn.momentum, brn.r_max, brn.d_max, brn.ramp_start, brn.ramp_end) == (
        conf["eps"],
        conf["momentum"],
        conf["r_max"],
        conf["d_max"],
        conf["ramp_start"],
        conf["ramp_end"],
    )
    sync, conf, bn = SyncBatchNorm2d(2), _conf("syncbn"), nn.BatchNorm2d(2)
    assert (sync.eps, sync.momentum) == (conf["eps"], conf["momentum"]) == (bn.eps, bn.momentum)


def test_brn_in_eval_mode_normalises_with_its_running_statistics() -> None:
    brn = BatchRenorm2d(2, eps=1e-3).double().eval()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, -2.0])), brn.running_var.copy_(torch.tensor([4.0, 0.5]))
        brn.weight.copy_(torch.tensor([2.0, 0.5])), brn.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    expected = (
        (x - torch.tensor([1.0, -2.0], dtype=F64).view(1, 2, 1, 1))
        / torch.sqrt(torch.tensor([4.0, 0.5], dtype=F64).view(1, 2, 1, 1) + 1e-3)
        * torch.tensor([2.0, 0.5], dtype=F64).view(1, 2, 1, 1)
    )
    expected = expected + torch.tensor([0.0, 1.0], dtype=F64).view(1, 2, 1, 1)
    torch.testing.assert_close(brn(x), expected, rtol=1e-12, atol=1e-12)
    assert int(brn.num_batches_tracked) == 0


def test_threaded_syncbn_of_a_bfloat16_model_keeps_float32_statistics(threaded_world) -> None:
    """A bf16 model and input far from zero (mean 100, spacing 0.5 in bf16): statistics rounded
    to bf16 would be off by up to 0.25, a quarter of a standard deviation. With float32
    statistics the output is the pooled BatchNorm of the same bf16 values within bf16 rounding,
    in bf16; running statistics in bf16 buffers; the input gradient in bf16."""
    shards = [(shard(rank)[0][:, :, :3, :3] + 100).bfloat16() for rank in range(2)]
    pooled = torch.cat([x.double().transpose(0, 1).reshape(2, -1) for x in shards], dim=1)
    mean, var = pooled.mean(1), pooled.var(1, correction=0)

    def rank_step(rank: int):
        norm = make_syncbn(rank, threaded_world).bfloat16()
        x = shards[rank].clone().requires_grad_()
        out = norm(x)
        out.float().sum().backward()
        return out, x.grad, norm.running_mean.clone()

    for rank, (out, grad, running_mean) in enumerate(run_ranks(rank_step)):
        assert out.dtype == grad.dtype == running_mean.dtype == torch.bfloat16
        x = shards[rank].double()
        expected = (x - mean.view(1, 2, 1, 1)) / torch.sqrt(var.view(1, 2, 1, 1) + 1e-3) * WEIGHT.view(
            1, 2, 1, 1
        ) + BIAS.view(1, 2, 1, 1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(running_mean.double(), 0.75 * 0.5 + 0.25 * mean, rtol=1e-2, atol=0)


def test_threaded_syncbn_gives_the_weight_its_gradient_when_only_the_bias_is_frozen(threaded_world) -> None:
    def rank_step(rank: int):
        x, g = shard(rank)
        norm = make_syncbn(rank, threaded_world)
        norm.bias.requires_grad_(False)
        (norm(x) * g).sum().backward()
        return norm.weight.grad, norm.bias.grad

    got = run_ranks(rank_step)
    ref = pooled_reference()
    assert got[0][1] is None and got[1][1] is None
    torch.testing.assert_close(got[0][0] + got[1][0], ref["w_grad"], rtol=1e-10, atol=1e-12)


def test_threaded_syncbn_of_two_values_per_channel_has_their_unbiased_running_variance(threaded_world) -> None:
    """One 1x1 value per rank: n = 2 values per channel, unbiased variance (a - b)^2 / 2."""
    values = [
        torch.tensor([1.0, -3.0], dtype=F64).view(1, 2, 1, 1),
        torch.tensor([4.0, 5.0], dtype=F64).view(1, 2, 1, 1),
    ]

    def rank_step(rank: int):
        norm = make_syncbn(rank, threaded_world, momentum=1.0)
        norm(values[rank])
        return norm.running_mean.clone(), norm.running_var.clone()

    for running_mean, running_var in run_ranks(rank_step):
        torch.testing.assert_close(running_mean, torch.tensor([2.5, 1.0], dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(running_var, torch.tensor([4.5, 32.0], dtype=F64), rtol=1e-12, atol=1e-12)


# --- CBN's pieces against autograd and einsum --------------------------------------------------------

from cbn_detect.norm.cbn_math import (  # noqa: E402
    cbn_window_forward,
    conv_geometry,
    mean_input_patch,
    sq_weight_grad,
    taylor_products,
)


def _autograd_weight_grads(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """d mean(y_c) / dW and d E[y_c^2] / dW for every channel c, by autograd in float64."""
    w = conv.weight.detach().double().requires_grad_()
    y = F.conv2d(x.double(), w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    d_mean = torch.autograd.grad(y.mean((0, 2, 3)).sum(), w, retain_graph=True)[0]
    d_sq = torch.autograd.grad((y**2).mean((0, 2, 3)).sum(), w)[0]
    return d_mean, d_sq


@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(kernel_size=1, padding=(1, 0)),
        dict(kernel_size=1, padding=1),
        dict(kernel_size=2),
        dict(kernel_size=1, stride=2),
        dict(kernel_size=3, padding=1, dilation=2, stride=(1, 2)),
    ],
)
def test_mean_input_patch_is_autograds_derivative_of_the_mean(conv_kw) -> None:
    """For 1x1 convs with and without padding (only the unpadded one may take the strided-mean
    shortcut), a 2x2 kernel, strides and dilation: (Cin, kh, kw), equal to autograd's d mean(y)/dW
    of any output channel (ungrouped: the same patch for all)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, bias=False, **conv_kw)
    x = torch.randn(2, 3, 7, 6, dtype=F64) + 1.0
    y = conv.double()(x)
    patch = mean_input_patch(x, conv_geometry(conv), tuple(y.shape[-2:]))
    d_mean, _ = _autograd_weight_grads(x, conv)
    assert patch.shape == d_mean.shape[1:] and patch.dtype == F64
    torch.testing.assert_close(patch, d_mean[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(patch, d_mean[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel_size, padding", [(1, 0), (3, 1)])
def test_mean_input_patch_of_bfloat16_input_is_accumulated_in_float32(kernel_size, padding) -> None:
    """bf16 input of mean 64: summed in bf16 the patch would be off by ~1e-2 relative; in the
    statistics dtype (float32) it matches float64 autograd to float32 rounding - also when written
    into a float32 ``out``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 1, kernel_size, padding=padding, bias=False)
    x = (torch.rand(8, 4, 9, 9) * 8 + 60).bfloat16()
    y_hw = (9, 9)
    d_mean, _ = _autograd_weight_grads(x.double(), conv)
    patch = mean_input_patch(x, conv_geometry(conv), y_hw)
    assert patch.dtype == torch.float32
    torch.testing.assert_close(patch.double(), d_mean[0], rtol=1e-6, atol=0)
    out = torch.empty(4, kernel_size, kernel_size)
    returned = mean_input_patch(x, conv_geometry(conv), y_hw, out=out)
    torch.testing.assert_close(out.double(), d_mean[0], rtol=1e-6, atol=0)
    assert returned.shape == out.shape


def test_sq_weight_grad_of_float16_does_not_overflow_where_the_plain_sum_would() -> None:
    """fp16, M = 4 x 48 x 48 = 9216 positions of values ~3: the weight-gradient convolution's plain
    sum of x*y (~9216 * 9 = 83k) exceeds fp16's 65504 (shown below: it is inf); scaled operands
    keep it finite. The result is d E[y^2]/dW = 2/M sum x*y over the same fp16 values, computed
    in float64, within fp16 rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1 / 6)
    x = (torch.rand(4, 2, 48, 48) + 2.5).half()
    y = F.conv2d(x.float(), conv.weight, padding=1).half()
    m = y.shape[0] * y.shape[2] * y.shape[3]

    def weight_grad(grad_y: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        weight = torch.empty(conv.weight.shape, dtype=inp.dtype)
        return torch.ops.aten.convolution_backward(
            grad_y, inp, weight, None, (1, 1), (1, 1), (1, 1), False, [0], 1, (False, True, False)
        )[1]

    assert torch.isinf(weight_grad(y, x)).any()  # the unscaled fp16 sum overflows
    expected = weight_grad(y.double(), x.double()) * (2 / m)
    got = sq_weight_grad(x, y, conv_geometry(conv))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=5e-3, atol=0)


@pytest.mark.parametrize("groups, channels", [(1, 1), (2, 4)])
def test_taylor_products_are_einsum_contractions(groups, channels) -> None:
    """W . patch (patch per input channel, shared by a group's output channels) and W . dsq, for
    every slot, against einsum; without ``out``, for one channel, and for a bf16 weight against
    float32 history."""
    torch.manual_seed(0)
    s, cin, k = 3, 4, 3
    w = torch.randn(channels, cin // groups, k, k)
    patch, dsq = torch.randn(s, cin, k, k), torch.randn(s, channels, cin // groups, k, k)
    got = taylor_products(w, patch, dsq, groups)
    assert got.shape == (s, 2, channels)
    group_patch = patch.view(s, groups, cin // groups, k, k).repeat_interleave(channels // groups, dim=1)
    torch.testing.assert_close(got[:, 0], torch.einsum("cikl,scikl->sc", w, group_patch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 1], torch.einsum("cikl,scikl->sc", w, dsq), rtol=1e-5, atol=1e-5)
    half = taylor_products(w.bfloat16(), patch, dsq, groups)
    assert half.dtype == torch.float32
    torch.testing.assert_close(
        half[:, 1], torch.einsum("cikl,scikl->sc", w.bfloat16().float(), dsq), rtol=1e-5, atol=1e-5
    )


def test_a_stored_batch_of_zero_variance_is_kept() -> None:
    """A dead channel's stored batch (all zeros: mean 0, E[y^2] 0, variance exactly 0) is a valid
    entry, not a negative-variance one: the window's mean is (m + 0) / 2, its variance
    (v + (m - mean)^2 + (0 - mean)^2) / 2, computed here for the masked path (``filled`` unknown)."""
    y = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]], dtype=F64)  # one channel: mean 4, variance 5
    res = cbn_window_forward(
        y,
        torch.ones(1, dtype=F64),
        torch.zeros(1, dtype=F64),
        0.0,
        0.0,
        torch.zeros(1, 1, dtype=F64),
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([True]),
        None,
    )
    mean, var = 2.0, (5.0 + 4.0 + 4.0) / 2
    assert res.count.tolist() == [2.0] and res.keep.tolist() == [[True]]
    torch.testing.assert_close(res.out, (y - mean) / var**0.5, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled-branch"])
def test_window_forward_of_bfloat16_keeps_float32_statistics_and_updates_bf16_buffers(compiling, monkeypatch) -> None:
    """bf16 input of mean 50 with bf16 running buffers (a bf16 model): the batch statistics are
    float32 (exact to float32 rounding against float64), the output bf16 BatchNorm of the batch
    (empty history), and the buffers get BatchNorm's update with the unbiased variance, rounded
    to bf16. Both the eager path and the branch given to torch.compile."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    y = (torch.randn(2, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 50).bfloat16()
    running_mean, running_var = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    res = cbn_window_forward(
        y,
        torch.ones(3, dtype=torch.bfloat16),
        torch.zeros(3, dtype=torch.bfloat16),
        1e-5,
        1.0,
        torch.zeros(1, 3),
        torch.zeros(1, 3),
        torch.tensor([False]),
        None,
        (running_mean, running_var, 0.5),
    )
    y64 = y.double()
    mean, var = y64.mean((0, 2, 3)), y64.var((0, 2, 3), correction=0)
    assert res.cur_mean.dtype == res.cur_var.dtype == torch.float32 and res.out.dtype == torch.bfloat16
    torch.testing.assert_close(res.cur_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(res.cur_var.double(), var, rtol=1e-5, atol=0)
    expected = (y64 - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
    torch.testing.assert_close(res.out.double(), expected, rtol=2e-2, atol=2e-2)
    assert running_mean.dtype == torch.bfloat16
    torch.testing.assert_close(running_mean.double(), 0.5 * mean, rtol=1e-2, atol=0)
    torch.testing.assert_close(running_var.double(), 0.5 + 0.5 * var * 32 / 31, rtol=1e-2, atol=0)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled-branch"])
def test_window_forward_of_one_value_per_channel_keeps_running_variance_finite(compiling, monkeypatch) -> None:
    """One value per channel (batch 1 on a 1x1 map): variance 0, and BatchNorm's unbiased factor
    m / (m - 1) is taken as 1, not 1/0. Two values a and b: the unbiased variance (a - b)^2 / 2."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    res = cbn_window_forward(
        y,
        torch.ones(2),
        torch.zeros(2),
        1e-5,
        1.0,
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.tensor([False]),
        None,
        (running_mean, running_var, 0.25),
    )
    assert res.out.abs().max() == 0.0
    torch.testing.assert_close(running_mean, torch.tensor([0.5, -0.25]))
    torch.testing.assert_close(running_var, torch.tensor([0.75, 0.75]))

    y = torch.tensor([[2.0, 4.0], [-1.0, 5.0]]).view(1, 2, 1, 2)  # two values per channel
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    cbn_window_forward(
        y,
        torch.ones(2),
        torch.zeros(2),
        1e-5,
        1.0,
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.tensor([False]),
        None,
        (running_mean, running_var, 1.0),
    )
    torch.testing.assert_close(running_mean, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(running_var, torch.tensor([2.0, 18.0]))


def test_conv_geometry_resolves_same_and_valid_padding_and_refuses_what_it_cannot_express() -> None:
    """'same' pads dilation * (kernel - 1) / 2 per side (integers: they reach F.pad and the
    weight-gradient convolution); an even effective kernel in either dimension would need
    asymmetric padding, and non-zero padding modes change which pixels an output sees: refused."""
    geom = conv_geometry(nn.Conv2d(2, 2, (3, 5), padding="same", dilation=(2, 3), stride=1))
    assert geom.padding == (2, 6) and all(type(p) is int for p in geom.padding)
    assert conv_geometry(nn.Conv2d(2, 2, 3, padding="valid")).padding == (0, 0)
    assert conv_geometry(nn.Conv2d(2, 4, 3, padding=(1, 2), stride=2, groups=2)) == (
        (2, 2),
        (1, 2),
        (1, 1),
        2,
        (4, 1, 3, 3),
    )
    for kernel in ((2, 3), (3, 2), (2, 2)):
        with pytest.raises(
            ValueError, match=r"^CBN cannot handle asymmetric 'same' padding \(even effective kernel\)$"
        ):
            conv_geometry(nn.Conv2d(2, 2, kernel, padding="same"))
    with pytest.raises(ValueError, match=r"^CBN supports only zero-padded convs, got padding_mode='reflect'$"):
        conv_geometry(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_sq_weight_grad_in_float64_and_of_float32_input_with_float16_output() -> None:
    """float64: autograd's d E[y^2]/dW to 1e-12, returned in float64. Under fp16 autocast the conv's
    input may still be float32 while y is fp16: the same result as for the fp16-rounded input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    y = F.conv2d(x, conv.weight.double(), padding=1)
    _, d_sq = _autograd_weight_grads(x, conv)
    got = sq_weight_grad(x, y, conv_geometry(conv))
    assert got.dtype == F64
    torch.testing.assert_close(got, d_sq, rtol=1e-12, atol=1e-12)
    y16, x16 = y.half(), x.half()
    torch.testing.assert_close(
        sq_weight_grad(x.float(), y16, conv_geometry(conv)),
        sq_weight_grad(x16, y16, conv_geometry(conv)),
        rtol=2e-3,
        atol=2e-3,
    )


# --- CBN's bookkeeping ---------------------------------------------------------------------------------


def _cbn_layer(window: int = 3, burnin: int = 0) -> nn.Sequential:
    from cbn_detect.norm import convert_norm

    torch.manual_seed(0)
    return convert_norm(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)), "cbn", window=window, burnin=burnin
    )


def _extra(norm) -> dict:
    state = norm.get_extra_state()
    return {
        **{k: v for k, v in state.items() if k != "history"},
        **{f"h.{k}": v.clone() for k, v in state["history"].items()},
    }


def test_step_state_and_restore_undo_exactly_one_training_forward() -> None:
    """Saved views of the slot the next forward overwrites, copied, then put back: the layer's
    counters and history are as before that forward - at every fill level, slot wrap included.
    Nothing to save in eval mode, before a burn-in forward (it fills no slot) or at window 1."""
    model = _cbn_layer(window=3)
    for step in range(5):
        x = torch.randn(2, 2, 5, 5)
        before = _extra(model[1])
        counters, views = model[1].step_state()
        assert counters == (step, min(step, 2), step % 2) and set(views) == {"stats", "patch", "dsq"}
        saved = {k: v.clone() for k, v in views.items()}
        model(x)
        assert _extra(model[1])["num_steps"] == step + 1
        model[1].restore_step_state(counters, saved)
        after = _extra(model[1])
        assert after.keys() == before.keys()
        for key in before:
            assert (
                torch.equal(after[key], before[key])
                if isinstance(before[key], torch.Tensor)
                else after[key] == before[key]
            ), (step, key)
        model(x)  # and now for real
    assert model[1].eval().step_state()[1] == {}
    assert _cbn_layer(window=1).train()[1].step_state()[1] == {}
    burning = _cbn_layer(burnin=2)
    assert burning[1].step_state() == ((0, 0, 0), {})
    burning(torch.randn(2, 2, 5, 5))
    assert burning[1].step_state()[1] == {}  # the second burn-in forward fills no slot either
    burning(torch.randn(2, 2, 5, 5))
    assert set(burning[1].step_state()[1]) == {"stats", "patch", "dsq"}


def test_history_bytes_is_every_slot_of_every_field() -> None:
    """window 4 on a 2 -> 3 channel 3x3 conv, float32: per slot 4 statistic rows x 3 channels, a
    2 x 3 x 3 input patch and a 3 x 2 x 3 x 3 derivative: (12 + 18 + 54) x 4 bytes, 3 slots."""
    from cbn_detect.norm import convert_norm

    model = convert_norm(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)), "cbn", window=4)
    assert model[1].history_bytes() == 3 * (12 + 18 + 54) * 4


def test_a_failing_compiler_on_auto_falls_back_to_the_reference_for_good(monkeypatch, caplog) -> None:
    """fused="auto" on CUDA: a torch.compile failure is logged once, names the error, and every
    later call takes the reference path; fused="on" raises instead."""
    import cbn_detect.norm.cbn as cbn_module
    from cbn_detect.norm.cbn_math import WindowInputs

    compiled_args: list = []

    def broken():
        def call(**kwargs):
            compiled_args.append(len(kwargs))
            raise RuntimeError("no compiler")

        return call

    monkeypatch.setattr(cbn_module, "_compiled_window_forward", broken)
    monkeypatch.setattr(cbn_module._FusedPath, "usable", True)
    model = _cbn_layer()
    model(torch.randn(2, 2, 5, 5))  # fills a slot
    calls: list = []
    monkeypatch.setattr(cbn_module, "cbn_window_forward", lambda **kwargs: calls.append(len(kwargs)) or "reference")
    layer = model[1]
    args = WindowInputs(*(None,) * len(WindowInputs._fields))
    caplog.set_level("WARNING", logger="cbn_detect.norm.cbn")
    assert layer._run_window_forward(args, on_cuda=True) == "reference"
    assert cbn_module._FusedPath.usable is False and calls == [11]
    assert [r.getMessage() for r in caplog.records] == [
        "CBN: torch.compile failed (RuntimeError: no compiler); using the reference path"
    ]
    assert layer._run_window_forward(args, on_cuda=True) == "reference" and len(caplog.records) == 1
    assert layer._run_window_forward(args, on_cuda=False) == "reference"
    layer.fused = "on"
    with pytest.raises(RuntimeError, match="no compiler"):
        layer._run_window_forward(args, on_cuda=False)
    assert compiled_args == [10, 10]  # the compiled graph gets every argument but ``filled``


def test_cbn_defaults_are_the_documented_ones_and_each_bad_option_is_refused() -> None:
    """Window 4, rho 1, eps and momentum as conf/norm/cbn.yaml composes them; burn-in 1000
    iterations as the class docstring says (the config derives its own from the schedule).
    Each invalid option alone is refused with the one message."""
    from cbn_detect.runtime.errors import ConfigError

    cbn, conf = CrossIterationBatchNorm2d(2), _conf("cbn")
    assert (cbn.window, cbn.rho, cbn.eps, cbn.momentum, cbn.fused) == (
        conf["window"],
        conf["rho"],
        conf["eps"],
        conf["momentum"],
        conf["fused"],
    )
    assert cbn.burnin == 1000
    message = r"^CBN needs norm.window >= 1, norm.burnin >= 0 and a float norm.momentum \(no cumulative average\), got "
    for options in (dict(window=0), dict(burnin=-1), dict(momentum=None)):
        with pytest.raises(ConfigError, match=message):
            CrossIterationBatchNorm2d(2, **options)
    with pytest.raises(ConfigError, match=r"^norm.fused='yes' must be one of \('auto', 'on', 'off'\)$"):
        CrossIterationBatchNorm2d(2, fused="yes")


def test_an_unwired_cbn_says_so_in_full() -> None:
    norm = CrossIterationBatchNorm2d(4, burnin=0)
    expected = (
        "CBN layer '<CBN not wired by convert_norm>': its input is not the output of the latest "
        "training-mode call of its producing conv. Wire it with convert_norm and apply it "
        "directly to that conv's output, right after the conv runs."
    )
    with pytest.raises(RuntimeError) as err:
        norm(torch.randn(2, 4, 3, 3))
    assert str(err.value) == expected


def test_cbn_counts_its_steps_and_names_its_history_fields() -> None:
    """One step per training forward (burn-in included) in num_batches_tracked; the saved history
    has its named fields with per-slot shapes: window 3 -> 2 slots of a 2 -> 3 channel 3x3 conv."""
    model = _cbn_layer(window=3, burnin=1)
    for step in range(1, 4):
        model(torch.randn(2, 2, 5, 5))
        assert int(model[1].num_batches_tracked) == step
    history = model[1].get_extra_state()["history"]
    assert {k: tuple(v.shape) for k, v in history.items()} == {
        "mean": (2, 3),
        "sq": (2, 3),
        "wpatch": (2, 3),
        "wdsq": (2, 3),
        "patch": (2, 2, 3, 3),
        "dsq": (2, 3, 2, 3, 3),
    }


def test_a_checkpoint_history_of_another_window_is_refused_in_full() -> None:
    model, other = _cbn_layer(window=3), _cbn_layer(window=2)
    model(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError) as err:
        other[1].set_extra_state(model[1].get_extra_state())
    assert str(err.value).startswith("CBN layer '1': checkpoint history {")
    assert str(err.value).endswith("(different window or conv, or a checkpoint saved before convert_norm)")


def test_window_forward_of_bfloat16_buffers_uses_the_per_channel_count_for_the_unbiased_variance() -> None:
    """bf16 buffers (a bf16 model) take the separate running-statistics update: for 8 images of a
    1x1 map the unbiased factor is 8 / 7 (m values per channel), not 24 / 23 (values per row)."""
    y = torch.arange(24, dtype=torch.float32).view(8, 3, 1, 1).bfloat16()
    running_mean, running_var = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    cbn_window_forward(
        y,
        torch.ones(3),
        torch.zeros(3),
        1e-5,
        1.0,
        torch.zeros(1, 3),
        torch.zeros(1, 3),
        torch.tensor([False]),
        None,
        (running_mean, running_var, 1.0),
    )
    var = y.double().var((0, 2, 3), correction=1)  # 8 values per channel, 3 apart: 9 * var(0..7) unbiased = 54
    torch.testing.assert_close(running_var.double(), var, rtol=8e-3, atol=0)
    assert var.tolist() == [54.0, 54.0, 54.0]


def test_cbn_after_a_frozen_conv_trains_its_affine_parameters() -> None:
    """A frozen producing conv and an input without gradient: the window step's backward computes
    no input gradient, only the affine ones - autograd's on the brute-force reference."""
    model = _cbn_layer(window=3)
    model[0].weight.requires_grad_(False)
    past = []
    for _ in range(3):
        x = torch.randn(2, 2, 5, 5)
        out = model(x)
        g = torch.randn(out.shape)
        (out * g).sum().backward()
        nw, nb = (
            model[1].weight.detach().double().clone().requires_grad_(),
            model[1].bias.detach().double().clone().requires_grad_(),
        )
        ref, _, _ = cbn_reference_step(
            x.double(), model[0].weight.double(), past, dict(padding=1), nw, nb, model[1].eps
        )
        (ref * g.double()).sum().backward()
        torch.testing.assert_close(model[1].weight.grad.double(), nw.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model[1].bias.grad.double(), nb.grad, rtol=1e-4, atol=1e-4)
        assert model[0].weight.grad is None
        model[1].weight.grad = model[1].bias.grad = None
        past = (past + [(x.double(), model[0].weight.double().clone(), None)])[-2:]
    assert model[1].last_window.count.min() == 3


def test_cbn_history_round_trips_for_naive_cbn_and_few_channels_without_sharing_memory() -> None:
    """Naive CBN (2 statistic rows) on 6 channels and Taylor CBN (4 rows) on 3: the state of a
    trained layer loads into a fresh one, which then continues exactly as the original; the
    loaded history is a copy (training on does not write into the checkpoint's tensors)."""
    from cbn_detect.norm import convert_norm

    for rho, channels in ((0.0, 6), (1.0, 3)):

        def make():
            torch.manual_seed(0)
            conv_bn = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
            return convert_norm(conv_bn, "cbn", window=3, burnin=0, rho=rho)

        model, fresh = make(), make()
        xs = [torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        for x in xs[:3]:
            model(x)
        state = model[1].get_extra_state()
        saved = {k: v.clone() for k, v in state["history"].items()}
        fresh.load_state_dict(model.state_dict())
        fresh[1].set_extra_state(state)
        torch.testing.assert_close(fresh(xs[3]), model(xs[3]), rtol=0, atol=0)
        assert all(torch.equal(state["history"][k], saved[k]) for k in saved), rho


def _load_as_version_2(norm: CrossIterationBatchNorm2d, extra_state: dict) -> None:
    """Load ``extra_state`` as from a checkpoint that recorded CBN's state as version 2."""
    state = norm.state_dict()
    state["_extra_state"] = extra_state
    state._metadata[""]["version"] = 2
    norm.load_state_dict(state)


def test_a_history_saved_with_weight_copies_loads_as_their_offsets(caplog) -> None:
    """Checkpoints of before the weight copies were dropped hold, per slot, a copy W_s of the conv
    weight: loading one (state version 2) turns it into the offsets W_s . patch_s and W_s . dsq_s
    (einsum here)."""
    model = _cbn_layer(window=3)
    for _ in range(2):
        model(torch.randn(2, 2, 5, 5))  # no optimizer step: W_s is the conv weight for both slots
    state = model[1].get_extra_state()
    history = {k: v for k, v in state["history"].items() if k not in ("wpatch", "wdsq")}
    weights = model[0].weight.detach().expand(2, *model[0].weight.shape).clone()
    old = {**state, "history": {**history, "weight": weights}}
    fresh = _cbn_layer(window=3)
    caplog.set_level("INFO", logger="cbn_detect.norm.cbn")
    _load_as_version_2(fresh[1], old)
    assert [r.getMessage() for r in caplog.records] == [
        "CBN layer '1': converted a checkpoint history with weight copies"
    ]
    loaded = fresh[1].get_extra_state()["history"]
    w = model[0].weight.detach()
    torch.testing.assert_close(
        loaded["wpatch"], torch.einsum("cikl,sikl->sc", w, history["patch"]), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(loaded["wdsq"], torch.einsum("cikl,scikl->sc", w, history["dsq"]), rtol=1e-5, atol=1e-6)
    assert "weight" not in loaded and torch.equal(loaded["mean"], history["mean"])
    unwired = CrossIterationBatchNorm2d(3, window=3)  # no conv to check the copies against
    with pytest.raises(ValueError, match="does not fit this layer"):
        _load_as_version_2(unwired, old)
    from cbn_detect.norm import convert_norm

    wider = convert_norm(nn.Sequential(nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)), "cbn", window=3)
    with pytest.raises(ValueError, match="does not fit this layer"):  # copies of another conv's weight
        _load_as_version_2(wider[1], old)


def test_attaching_cbn_to_a_conv_of_other_width_names_both() -> None:
    from cbn_detect.norm.producer import ProducerLink

    with pytest.raises(ValueError, match=r"^CBN layer 'head.norm' has 4 channels but its conv produces 3$"):
        CrossIterationBatchNorm2d(4).attach(ProducerLink(nn.Conv2d(2, 3, 3)), "head.norm")
