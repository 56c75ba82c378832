"""``python -m cbn_detect.bench gpu``: every CUDA check in one process, one JSON and one markdown table.

Run it once on a machine with a CUDA GPU to check that the GPU paths agree with the CPU-tested
ones, and to get the benchmark rows on that GPU. From the repository root, with the project's
environment installed::

    python -m cbn_detect.bench gpu

It takes about 8 minutes on one H100 or H200 (most of it in the four short training runs) and
needs nothing but the GPU and the installed requirements: no network, no dataset (the runs use the
built-in synthetic data). The checks:

- ``cbn_fused_fp32``, ``cbn_fused_bf16`` (CUDA only): CBN's compiled window (``norm.fused=on``)
  against its reference path (``off``) on a ResNet-18 trunk over a few SGD steps with a full
  window: outputs and the first conv's weight gradient, relative to their largest value, within
  1e-3 in fp32 and 5e-2 under bf16 autocast;
- ``native_syncbn``: our SyncBN swapped for ``nn.SyncBatchNorm`` (``use_native_sync_batchnorm``) on
  a trunk, without any process group (no DDP, no NCCL): outputs, gradients and running statistics
  over a few SGD steps equal plain BN's (relative 1e-5, for cuDNN's non-deterministic backward);
- ``amp_bf16``, ``amp_fp16``: a few training steps of a small trunk under autocast for every norm
  of ``cbn_detect.norm.NORM_NAMES`` (fp16 with the trainer's loss scaling, overflowing steps skipped
  while the scale settles, as in training): losses, parameters and statistics finite;
- ``bench_norm``, ``bench_train``, ``bench_infer``: the benchmark rows as ``python -m
  cbn_detect.bench <row>`` runs them by default (ResNet-50 trunk batch 8 at 512 px under every
  norm; our RetinaNet-R50 against torchvision's, batch 16 at 512 px; batch-1 FPS of torchvision's
  RetinaNet-R50 against the fast path, whose detections must all match);
- ``train_ssd_bn``, ``train_ssd_cbn``, ``train_retinanet_bn``, ``train_retinanet_cbn``: 300
  iterations of ``ssd300`` (300 px) and ``retinanet_r50`` (512 px) at batch 4 with BN and CBN
  (burn-in a quarter of the run) on synthetic data, through the real entry point with its final
  evaluation and FPS (``python -m cbn_detect.train -m norm=bn,cbn ...``, one process per model):
  completed, no non-finite step, a finite final loss. Their time is the run's own (training and
  evaluation); the summary adds the wall time of the process of both norms.

Each check records its status (passed, failed, skipped), its numbers and its time; a failing check
never stops the others, and the JSON and markdown are rewritten after every check, so a run cut
short still leaves what it measured. ``--budget-s`` skips the checks that would start after that
many seconds; ``--only CHECK ...`` reruns some checks. ``--device cpu --tiny`` runs the same checks
at tiny sizes on a CPU in under a minute (the CUDA-only ones skipped, saying so).

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default
``multirun/gpu_check/<date>_<time>``) and prints the markdown table; the training runs go to a
temporary folder (``--work DIR`` keeps them). Exit code 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision
from torch import Tensor, nn

import cbn_detect
from cbn_detect.bench import infer as infer_row
from cbn_detect.bench import norm as norm_row
from cbn_detect.bench import train as train_row
from cbn_detect.bench.common import device_name
from cbn_detect.engine.precision import Precision
from cbn_detect.models.backbone import ResNetTrunk
from cbn_detect.norm import NORM_NAMES, convert_norm, use_native_sync_batchnorm
from cbn_detect.runtime import io

REPO = Path(cbn_detect.__file__).resolve().parents[1]
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"

FUSED_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
"""Largest difference of CBN's compiled path from its reference, relative to the largest value."""
SYNCBN_TOLERANCE = 1e-5
"""Largest difference of ``nn.SyncBatchNorm`` (no process group) from BN, relative."""
MAX_SKIPPED = 20
"""Overflowing fp16 steps in a row the AMP check allows (the default ``train.max_nonfinite``)."""


@dataclass(frozen=True)
class Plan:
    """The sizes of every check: one plan for a GPU, one (``--tiny``) for a CPU test run."""

    trunk: tuple[str, int]  # (depth, base width) of the small trunk of the norm checks
    trunk_batch: int
    trunk_size: int
    steps: int  # SGD steps of the norm checks
    bench_args: dict[str, list[str]]  # options of each benchmark row
    models: dict[str, str]  # check family -> model config
    sizes: dict[str, list[str]]  # check family -> size overrides
    train: list[str]  # overrides of every training run
    run_timeout_s: int  # one model family's training runs (one process)
    budget_s: int


GPU_PLAN = Plan(
    trunk=("resnet18", 64), trunk_batch=8, trunk_size=160, steps=6, bench_args={"norm": [], "train": [], "infer": []},
    models={"ssd": "ssd300", "retinanet": "retinanet_r50"},
    sizes={"ssd": ["model.size=300"], "retinanet": ["model.min_size=512", "model.max_size=512"]},
    train=[
        "data.source.num_train=400", "data.source.num_val=8", "data.source.num_test=32",
        "data.source.image_size=300", "data.batch=4", "data.workers=6", "train.epochs=3", "train.log_every=25",
        "optim.lr=0.01", "optim.warmup.iters=100", "cbn_burnin=0.25", "eval.batch=8", "eval.fps_images=20",
        "eval.fps_warmup=5",
    ],
    run_timeout_s=330, budget_s=450,
)
TINY_PLAN = Plan(
    trunk=("resnet10", 8), trunk_batch=2, trunk_size=32, steps=2,
    bench_args={
        "norm": ["--tiny", "--size", "32", "--iters", "1", "--warmup", "1"],
        "train": ["--tiny", "--iters", "1", "--warmup", "0"],
        "infer": ["--tiny", "--images", "1", "--warmup", "0"],
    },
    models={"ssd": "ssd_tiny", "retinanet": "retinanet_tiny"},
    sizes={"ssd": ["model.size=64"], "retinanet": ["model.min_size=64", "model.max_size=64"]},
    train=[
        "data.source.num_train=8", "data.source.num_val=2", "data.source.num_test=4",
        "data.source.image_size=64", "data.batch=4", "data.workers=0", "train.epochs=1", "train.log_every=1",
        "optim.warmup.iters=1", "cbn_burnin=1", "eval.batch=4", "eval.fps_images=1", "eval.fps_warmup=0",
        "threads=1", "diagnostics.level=off",
    ],
    run_timeout_s=240, budget_s=600,
)


@dataclass
class Context:
    device: torch.device
    plan: Plan
    work: Path
    deadline: float
    selected: set[str] | None = None  # --only
    sweeps: dict[str, Any] = field(default_factory=dict)  # model family -> its training Sweep

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Check:
    name: str
    what: str
    run: Callable[[Context], dict[str, Any]]
    """Returns the numbers, with ``passed`` (bool) and a one-line ``summary``."""
    cuda_only: bool = False


@dataclass
class Record:
    name: str
    what: str
    status: str = "skipped"
    time_s: float = 0.0
    summary: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# helpers


def relative_gap(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |a| (0 when both are all zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(a.abs().max())
    gap = float((a - b).abs().max())
    return gap / scale if scale > 0 else gap


def small_trunk(ctx: Context, norm: str, **options: Any) -> nn.Module:
    """A from-scratch ResNet trunk (stem and 4 stages) with ``norm``, on the device, seeded."""
    torch.manual_seed(0)
    depth, width = ctx.plan.trunk
    trunk = nn.Sequential(*ResNetTrunk(depth, width).children())
    trunk = convert_norm(trunk, norm, **options).to(ctx.device)
    if ctx.device.type == "cuda":
        trunk = use_native_sync_batchnorm(trunk)
    return trunk.train()


def trunk_batches(ctx: Context, count: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (ctx.plan.trunk_batch, 3, ctx.plan.trunk_size, ctx.plan.trunk_size)
    return [torch.randn(shape, generator=gen).to(ctx.device) for _ in range(count)]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


def norm_options(name: str) -> dict[str, Any]:
    """Options that put each norm on its full training path at step 0: CBN without burn-in, BRN
    with its (r, d) correction already open."""
    if name in ("cbn", "cbn_naive"):
        return {"burnin": 0}
    if name == "brn":
        return {"ramp_start": 0, "ramp_end": 1}
    return {}


# ---------------------------------------------------------------------------------------------
# the checks


def cbn_fused(dtype: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        models = {fused: small_trunk(ctx, "cbn", burnin=0, window=4, fused=fused) for fused in ("off", "on")}
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
        out_gap = grad_gap = 0.0
        for x in trunk_batches(ctx, ctx.plan.steps):
            seen = {}
            for key, model in models.items():
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    out = model(x)
                out.float().square().mean().backward()
                seen[key] = (out.detach().float(), first_conv(model).weight.grad.detach().clone())
                optimizers[key].step()
                optimizers[key].zero_grad(set_to_none=True)
            out_gap = max(out_gap, relative_gap(seen["off"][0], seen["on"][0]))
            grad_gap = max(grad_gap, relative_gap(seen["off"][1], seen["on"][1]))
        window = min(int(m._count) + 1 for m in models["on"].modules() if hasattr(m, "_count"))
        tolerance = FUSED_TOLERANCE[dtype]
        return {
            "passed": out_gap <= tolerance and grad_gap <= tolerance and window > 1,
            "summary": f"output gap {out_gap:.2e}, conv1 grad gap {grad_gap:.2e} (relative; tolerance {tolerance:g}); "
            f"window {window}",
            "output_gap": out_gap, "grad_gap": grad_gap, "tolerance": tolerance, "window": window,
            "steps": ctx.plan.steps,
        }

    return run


def native_syncbn(ctx: Context) -> dict[str, Any]:
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("a process group is initialised: this check is for the path without one")
    bn = small_trunk(ctx, "bn")
    sync = use_native_sync_batchnorm(small_trunk(ctx, "syncbn"))
    layers = sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (bn, sync)]
    out_gap = grad_gap = 0.0
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same convolution algorithms on both sides
    try:
        for x in trunk_batches(ctx, ctx.plan.steps):
            outs, grads = [], []
            for model, optimizer in zip((bn, sync), optimizers):
                out = model(x)
                out.square().mean().backward()
                outs.append(out.detach())
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out_gap = max(out_gap, relative_gap(*outs))
            grad_gap = max(grad_gap, relative_gap(*grads))
    finally:
        torch.backends.cudnn.deterministic = deterministic
    stats_gap = max(
        relative_gap(a, b) for a, b in zip(bn.buffers(), sync.buffers()) if a.is_floating_point()
    )
    worst = max(out_gap, grad_gap, stats_gap)
    return {
        "passed": layers > 0 and worst <= SYNCBN_TOLERANCE,
        "summary": f"{layers} nn.SyncBatchNorm layers, no process group: output gap {out_gap:.1e}, gradient gap "
        f"{grad_gap:.1e}, running-statistics gap {stats_gap:.1e} to BN (tolerance {SYNCBN_TOLERANCE:g})",
        "layers": layers, "output_gap": out_gap, "grad_gap": grad_gap, "stats_gap": stats_gap,
        "tolerance": SYNCBN_TOLERANCE, "steps": ctx.plan.steps,
    }


def amp_steps(mode: str) -> Callable[[Context], dict[str, Any]]:
    """``plan.steps`` applied training steps per norm under autocast, the trainer's ``Precision``
    doing the loss scaling. An fp16 step whose gradients overflow is skipped and lowers the loss
    scale, as in training; up to ``MAX_SKIPPED`` of them in a row are allowed (the trainer's
    ``train.max_nonfinite``), since the scale starts at 2^16 and may need a few halvings."""

    def run(ctx: Context) -> dict[str, Any]:
        per_norm: dict[str, dict[str, Any]] = {}
        batches = trunk_batches(ctx, ctx.plan.steps)
        for name in NORM_NAMES:
            model = small_trunk(ctx, name, **norm_options(name))
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            precision = Precision(mode, ctx.device)
            losses, applied, skipped_in_a_row = [], 0, 0
            while applied < ctx.plan.steps and skipped_in_a_row <= MAX_SKIPPED:
                optimizer.zero_grad(set_to_none=True)
                with precision.autocast():
                    loss = model(batches[applied]).float().square().mean()
                precision.backward(loss)
                precision.unscale(optimizer)
                if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None):
                    precision.step(optimizer)
                    applied, skipped_in_a_row = applied + 1, 0
                else:
                    precision.skip()
                    skipped_in_a_row += 1
                losses.append(float(loss.detach()))
            per_norm[name] = {
                "losses": losses, "applied_steps": applied, "skipped_steps": len(losses) - applied,
                "loss_scale": float(precision.scaler.get_scale()) if mode == "fp16" else None,
                "passed": all(math.isfinite(v) for v in losses) and applied == ctx.plan.steps and finite(model),
            }
        failing = [n for n, r in per_norm.items() if not r["passed"]]
        skipped = sum(r["skipped_steps"] for r in per_norm.values())
        return {
            "passed": not failing,
            "summary": (f"failing: {', '.join(failing)}" if failing else f"all {len(per_norm)} norms finite")
            + f"; {ctx.plan.steps} applied steps each"
            + (f", {skipped} overflowing steps skipped while the loss scale settled" if skipped else ""),
            "norms": per_norm,
        }

    return run


def _rows(rows: list[tuple]) -> list[list[Any]]:
    return [list(r) for r in rows]


def bench_norm(ctx: Context) -> dict[str, Any]:
    args = norm_row.parse_args(["--device", str(ctx.device), *ctx.plan.bench_args["norm"]])
    rows = norm_row.benchmark(args)  # (norm, median step ms, ratio to bn, ...)
    ok = all(math.isfinite(r[1]) and r[1] > 0 for r in rows)
    ratios = ", ".join(f"{r[0]} {r[2]:.2f}" for r in rows[1:])
    return {
        "passed": ok,
        "summary": f"{getattr(args, 'arch', '')} batch {args.batch} x {args.size}px, step time / bn ({rows[0][1]:.1f} ms): {ratios}",
        "rows": _rows(rows), "table": norm_row.format_table(rows, args),
    }


def bench_train(ctx: Context) -> dict[str, Any]:
    args = train_row.parse_args(["--device", str(ctx.device), *ctx.plan.bench_args["train"]])
    rows = train_row.benchmark(args)
    ok = all(math.isfinite(ms) and ms > 0 for _, _, ms, _, _ in rows)
    rates = ", ".join(f"{label} {rate:.1f} img/s ({ratio:.2f})" for label, _, _, rate, ratio in rows)
    return {
        "passed": ok,
        "summary": f"RetinaNet {train_row.arch_of(args).name} batch {args.batch} x {args.size}px: {rates}",
        "rows": _rows(rows), "table": train_row.format_table(rows, args),
    }


def bench_infer(ctx: Context) -> dict[str, Any]:
    args = infer_row.parse_args(["--device", str(ctx.device), *ctx.plan.bench_args["infer"]])
    rows, (matched, total) = infer_row.benchmark(args)
    fps = ", ".join(f"{label} {rate:.1f} FPS" for label, _, rate, _ in rows)
    return {
        "passed": matched == total > 0,
        "summary": f"batch 1 x {args.size}px: {fps} (x{rows[1][3]:.2f}); detections matched {matched}/{total}",
        "rows": _rows(rows), "matched": matched, "total": total,
        "table": infer_row.format_table(rows, (matched, total), args),
    }


TRAIN_NORMS = ("bn", "cbn")


@dataclass(frozen=True)
class Sweep:
    """One ``python -m cbn_detect.train -m ... norm=bn,cbn`` process: a model family's runs."""

    folder: Path
    overrides: list[str]
    returncode: int | None  # None: stopped at its time limit
    wall_s: float
    tail: str


def training_sweep(ctx: Context, family: str) -> Sweep:
    """The family's training runs, one job per norm in one process (the interpreter, imports and
    CUDA start once), run when the first of its checks asks and kept for the others. A job that
    fails does not end the sweep (the entry point records it in its ``results.json``)."""
    if family in ctx.sweeps:
        return ctx.sweeps[family]
    norms = [n for n in TRAIN_NORMS if ctx.selected is None or f"train_{family}_{n}" in ctx.selected]
    folder = ctx.work / "runs" / family
    overrides = [
        f"model={ctx.plan.models[family]}", f"norm={','.join(norms)}", "data=synthetic",
        f"data.root={ctx.work / 'data'}", *ctx.plan.sizes[family], *ctx.plan.train, f"device={ctx.device}",
        "wandb.mode=disabled", "train.progress=off", "train.resume=never", f"hydra.sweep.dir={folder}",
        "hydra.sweep.subdir=${norm.name}",
    ]
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    timeout = max(1.0, min(ctx.plan.run_timeout_s, ctx.remaining_s()))
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", "-m", *overrides], cwd=ctx.work, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the run and its data-loader workers
        output, _ = process.communicate()
        returncode = None
    sweep = Sweep(folder, overrides, returncode, time.perf_counter() - start, "\n".join(output.splitlines()[-5:]))
    ctx.sweeps[family] = sweep
    return sweep


def train_run(family: str, norm: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        model = ctx.plan.models[family]
        sweep = training_sweep(ctx, family)
        run_dir = sweep.folder / norm
        shared = {"model": model, "norm": norm, "sweep_wall_s": sweep.wall_s, "overrides": sweep.overrides}
        results_file = run_dir / "results.json"
        if not results_file.is_file():
            why = "stopped at its time limit" if sweep.returncode is None else f"exit {sweep.returncode}"
            return {
                "passed": False, "summary": f"{model} {norm}: no results.json ({why}): {sweep.tail[-300:]}",
                **shared,
            }
        results = json.loads(results_file.read_text())
        metrics = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        final = results.get("final_loss")
        fps = (results.get("fps") or {}).get("fps_model")
        job_s = (results.get("train_time_s") or 0) + (results.get("eval_time_s") or 0)
        numbers = {
            **shared, "status": results.get("status"), "steps": results.get("steps"),
            "nonfinite_steps": results.get("nonfinite_steps"), "first_loss": losses[0] if losses else None,
            "final_loss": final, "map_voc07": results.get("map_voc07"), "fps_model": fps,
            "train_time_s": results.get("train_time_s"), "eval_time_s": results.get("eval_time_s"),
            "error": results.get("error"),
        }
        passed = (
            results.get("status") == "completed"
            and (results.get("steps") or 0) > 0
            and results.get("nonfinite_steps") == 0
            and isinstance(final, (int, float)) and math.isfinite(final)
        )
        loss = f"{losses[0]:.3g} -> " if losses else ""
        loss += "?" if not isinstance(final, (int, float)) else f"{final:.3g}"
        summary = (
            f"{model} {norm}: {results.get('status')}, {results.get('steps')} iterations "
            f"({results.get('nonfinite_steps')} non-finite), loss {loss}, VOC07 mAP {results.get('map_voc07') or 0:.3f}, "
            f"{fps or 0:.1f} FPS; train {results.get('train_time_s') or 0:.0f} s + eval "
            f"{results.get('eval_time_s') or 0:.0f} s (process of the {family} runs: {sweep.wall_s:.0f} s)"
        )
        if results.get("error"):
            summary += f"; error: {' '.join(str(results['error']).split())[:200]}"
        return {"passed": passed, "summary": summary, "time_s": job_s, **numbers}

    return run


CHECKS: tuple[Check, ...] = (
    Check("cbn_fused_fp32", "CBN fused=on vs off on CUDA, fp32", cbn_fused("fp32"), cuda_only=True),
    Check("cbn_fused_bf16", "CBN fused=on vs off on CUDA, bf16 autocast", cbn_fused("bf16"), cuda_only=True),
    Check("native_syncbn", "nn.SyncBatchNorm swap without a process group equals BN", native_syncbn),
    Check("amp_bf16", "bf16 autocast training steps finite, every norm", amp_steps("bf16")),
    Check("amp_fp16", "fp16 autocast + loss scaling training steps finite, every norm", amp_steps("fp16")),
    Check("bench_norm", "benchmark row norm (trunk training step per norm)", bench_norm),
    Check("bench_train", "benchmark row train (RetinaNet training, ours vs torchvision)", bench_train),
    Check("bench_infer", "benchmark row infer (batch-1 FPS, fast path vs torchvision)", bench_infer),
    Check("train_ssd_bn", "SSD with BN through python -m cbn_detect.train", train_run("ssd", "bn")),
    Check("train_ssd_cbn", "SSD with CBN through python -m cbn_detect.train", train_run("ssd", "cbn")),
    Check("train_retinanet_bn", "RetinaNet with BN through python -m cbn_detect.train", train_run("retinanet", "bn")),
    Check("train_retinanet_cbn", "RetinaNet with CBN through python -m cbn_detect.train", train_run("retinanet", "cbn")),
)


# ---------------------------------------------------------------------------------------------
# running and reporting


def run_check(check: Check, ctx: Context) -> Record:
    record = Record(check.name, check.what)
    if check.cuda_only and ctx.device.type != "cuda":
        record.summary = "skipped: needs CUDA"
        return record
    if ctx.remaining_s() <= 0:
        record.summary = "skipped: the time budget (--budget-s) ran out"
        return record
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    try:
        numbers = check.run(ctx)
        record.status = "passed" if numbers.pop("passed") else "failed"
        record.summary = numbers.pop("summary")
        record.time_s = float(numbers.pop("time_s", time.perf_counter() - start))
        record.numbers = numbers
    except Exception as err:  # noqa: BLE001 - a failing check must not stop the others
        record.status = "failed"
        record.summary = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        record.error = traceback.format_exc()[-4000:]
        record.time_s = time.perf_counter() - start
    if ctx.device.type == "cuda":
        record.numbers["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def environment(ctx: Context, argv: list[str]) -> dict[str, Any]:
    return {
        "command": "python -m cbn_detect.bench gpu " + " ".join(argv),
        "device": device_name(ctx.device),
        "tiny": ctx.plan is TINY_PLAN,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
    }


def markdown(env: dict[str, Any], records: list[Record], total_s: float) -> str:
    counts = {s: sum(r.status == s for r in records) for s in ("passed", "failed", "skipped")}
    lines = [
        f"# GPU checks: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
        f"({total_s:.0f} s)",
        "",
        f"`{env['command']}` on {env['device']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"CUDA {env['cuda']}, started {env['started']}{' (tiny CPU sizes)' if env['tiny'] else ''}.",
        "",
        "| check | status | time (s) | result |",
        "| --- | --- | ---: | --- |",
    ]
    for r in records:
        summary = r.summary.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {r.time_s:.1f} | {summary} |")
    lines += ["", "## What each check does", ""]
    lines += [f"- `{c.name}`: {c.what}{' (CUDA only)' if c.cuda_only else ''}" for c in CHECKS]
    tables = [(r.name, r.numbers["table"]) for r in records if "table" in r.numbers]
    for name, table in tables:
        lines += ["", f"## {name}", "", "```", table, "```"]
    failures = [r for r in records if r.error]
    for r in failures:
        lines += ["", f"## {r.name}: traceback", "", "```", r.error.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, env: dict[str, Any], records: list[Record], total_s: float) -> None:
    counts = {s: sum(r.status == s for r in records) for s in ("passed", "failed", "skipped")}
    payload = {**env, "total_s": total_s, **counts, "checks": [vars(r) for r in records]}
    io.write_json(out / JSON_NAME, payload)
    io.write_text(out / MARKDOWN_NAME, markdown(env, records, total_s))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cbn_detect.bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU test run (the CUDA-only checks skip)")
    p.add_argument(
        "--out", type=Path, default=None,
        help="folder for gpu_check.json and gpu_check.md (default multirun/gpu_check/<date>_<time>)",
    )
    p.add_argument("--work", type=Path, default=None, help="folder for the training runs (default: a temporary one)")
    p.add_argument("--only", nargs="+", default=None, metavar="CHECK", help="run only these checks")
    p.add_argument("--budget-s", type=float, default=None, help="no check starts after this many seconds")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("multirun") / "gpu_check" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    unknown = set(args.only or []) - {c.name for c in CHECKS}
    if unknown:
        p.error(f"unknown checks {sorted(unknown)}; valid: {', '.join(c.name for c in CHECKS)}")
    return args


def run(argv: list[str]) -> int:
    """Run every check, write the JSON and markdown, print the markdown; 1 if any check failed."""
    args = parse_args(argv)
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    budget = args.budget_s if args.budget_s is not None else plan.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="cbn_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.device, plan, work.resolve(), time.monotonic() + budget, set(args.only) if args.only else None)
    env = environment(ctx, argv)
    start = time.perf_counter()
    records = [Record(c.name, c.what, summary="not run yet") for c in CHECKS]
    try:
        for i, check in enumerate(CHECKS):
            if args.only is not None and check.name not in args.only:
                records[i].summary = "skipped: not in --only"
                continue
            records[i] = run_check(check, ctx)
            print(f"[gpu check] {check.name}: {records[i].status} in {records[i].time_s:.1f} s: {records[i].summary}",
                  flush=True)
            write_report(args.out, env, records, time.perf_counter() - start)
        write_report(args.out, env, records, time.perf_counter() - start)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(env, records, time.perf_counter() - start))
    return 1 if any(r.status == "failed" for r in records) else 0
