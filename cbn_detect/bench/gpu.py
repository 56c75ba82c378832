"""``python -m cbn_detect.bench gpu``: every GPU timing in one process, one JSON and one markdown table.

Run it once on a machine with a CUDA GPU to get the benchmark rows and the time of short training
runs on that GPU. From the repository root, with the project's environment installed::

    python -m cbn_detect.bench gpu

It takes under 8 minutes on one H100 or H200 (most of it in the four short training runs) and
needs nothing but the GPU and the installed requirements: no network, no dataset (the runs use the
built-in synthetic data). The rows:

- ``bench_norm``, ``bench_train``, ``bench_infer``: the benchmark rows as ``python -m
  cbn_detect.bench <row>`` runs them by default (ResNet-50 trunk batch 8 at 512 px under every
  norm; our RetinaNet-R50 against torchvision's, batch 16 at 512 px; batch-1 FPS of torchvision's
  RetinaNet-R50 against the fast path, with how many of its detections the fast path found);
- ``train_ssd_bn``, ``train_ssd_cbn``, ``train_retinanet_bn``, ``train_retinanet_cbn``: 300
  iterations of ``ssd300`` (300 px) and ``retinanet_r50`` (512 px) at batch 4 with BN and CBN
  (burn-in a quarter of the run) on synthetic data, through the real entry point with its final
  evaluation and FPS (``python -m cbn_detect.train -m norm=bn,cbn ...``, one process per model).
  Their time is the run's own (training and evaluation); the summary adds the wall time of the
  process of both norms, the run's status, loss, mAP and FPS.

Whether the GPU paths compute what the CPU-tested ones do (CBN's compiled window, native SyncBN,
mixed precision for every norm, the fast inference path, training runs staying finite) is a test
suite, not a timing: ``pytest tests/gpu`` on the same machine.

Each row records its status (measured, failed, skipped), its timings and its time; a failing row
never stops the others, and the JSON and markdown are rewritten after every row, so a run cut
short still leaves what it measured. ``--budget-s`` skips the rows that would start after that
many seconds; ``--only ROW ...`` reruns some rows. ``--device cpu --tiny`` runs the same rows at
tiny sizes on a CPU in under a minute.

It writes ``gpu_bench.json`` and ``gpu_bench.md`` into ``--out`` (default
``multirun/gpu_bench/<date>_<time>``) and prints the markdown table; the training runs go to a
temporary folder (``--work DIR`` keeps them). Exit code 0 when no row failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

import cbn_detect
from cbn_detect.bench import infer as infer_row
from cbn_detect.bench import norm as norm_row
from cbn_detect.bench import train as train_row
from cbn_detect.bench.common import device_name
from cbn_detect.results import read_results
from cbn_detect.runtime import io

REPO = Path(cbn_detect.__file__).resolve().parents[1]
JSON_NAME, MARKDOWN_NAME = "gpu_bench.json", "gpu_bench.md"
STATUSES = ("measured", "failed", "skipped")


@dataclass(frozen=True)
class Plan:
    """The sizes of every row: one plan for a GPU, one (``--tiny``) for a CPU test run."""

    bench_args: dict[str, list[str]]  # options of each benchmark row
    models: dict[str, str]  # training family -> model config
    sizes: dict[str, list[str]]  # training family -> size overrides
    train: list[str]  # overrides of every training run
    run_timeout_s: int  # one model family's training runs (one process)
    budget_s: int


GPU_PLAN = Plan(
    bench_args={"norm": [], "train": [], "infer": []},
    models={"ssd": "ssd300", "retinanet": "retinanet_r50"},
    sizes={"ssd": ["model.size=300"], "retinanet": ["model.min_size=512", "model.max_size=512"]},
    train=[
        "data.source.num_train=400",
        "data.source.num_val=8",
        "data.source.num_test=32",
        "data.source.image_size=300",
        "data.batch=4",
        "data.workers=6",
        "train.epochs=3",
        "train.log_every=25",
        "optim.lr=0.01",
        "optim.warmup.iters=100",
        "cbn_burnin=0.25",
        "eval.batch=8",
        "eval.fps_images=20",
        "eval.fps_warmup=5",
    ],
    run_timeout_s=330,
    budget_s=450,
)
TINY_PLAN = Plan(
    bench_args={
        "norm": ["--tiny", "--size", "32", "--iters", "1", "--warmup", "1"],
        "train": ["--tiny", "--iters", "1", "--warmup", "0"],
        "infer": ["--tiny", "--images", "1", "--warmup", "0"],
    },
    models={"ssd": "ssd_tiny", "retinanet": "retinanet_tiny"},
    sizes={"ssd": ["model.size=64"], "retinanet": ["model.min_size=64", "model.max_size=64"]},
    train=[
        "data.source.num_train=8",
        "data.source.num_val=2",
        "data.source.num_test=4",
        "data.source.image_size=64",
        "data.batch=4",
        "data.workers=0",
        "train.epochs=1",
        "train.log_every=1",
        "optim.warmup.iters=1",
        "cbn_burnin=1",
        "eval.batch=4",
        "eval.fps_images=1",
        "eval.fps_warmup=0",
        "threads=1",
        "diagnostics.level=off",
    ],
    run_timeout_s=240,
    budget_s=600,
)


# ---------------------------------------------------------------------------------------------
# what a row measures


@dataclass(frozen=True)
class NormTiming:
    """One line of ``bench norm``: a trunk training step under one norm."""

    norm: str
    step_ms: float
    ratio_to_bn: float
    history_mib: float


@dataclass(frozen=True)
class TrainTiming:
    """One line of ``bench train``: a RetinaNet training step, ours or torchvision's."""

    model: str
    params_m: float
    step_ms: float
    images_per_s: float
    ratio_to_torchvision: float


@dataclass(frozen=True)
class InferTiming:
    """One line of ``bench infer``: batch-1 inference through one path."""

    path: str
    ms_per_image: float
    fps: float
    ratio_to_torchvision: float


@dataclass(frozen=True)
class RunTiming:
    """One training run through ``python -m cbn_detect.train``, as its ``results.json`` tells it."""

    model: str
    norm: str
    status: str
    steps: int | None
    nonfinite_steps: int | None
    first_loss: float | None
    final_loss: float | None
    map_voc07: float | None
    fps_model: float | None
    train_time_s: float | None
    eval_time_s: float | None
    sweep_wall_s: float
    """The process of both norms of the model family, start to end."""
    overrides: tuple[str, ...]
    error: str | None = None


Timing = NormTiming | TrainTiming | InferTiming | RunTiming


@dataclass(frozen=True)
class Measurement:
    """What a row returns: one line of summary, its timings, the benchmark's own table."""

    summary: str
    timings: tuple[Timing, ...]
    table: str | None = None
    time_s: float | None = None
    """The row's own time when it is not the call's (a training run's: training and evaluation)."""


class NotMeasured(Exception):
    """A row whose measurement could not be made (a training run that did not complete); the
    message says why."""


@dataclass
class Context:
    device: torch.device
    plan: Plan
    work: Path
    deadline: float
    selected: set[str] | None = None  # --only
    sweeps: dict[str, Sweep] = field(default_factory=dict)  # model family -> its training runs

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    measure: Callable[[Context], Measurement]


@dataclass
class Record:
    """A row's outcome, as the JSON and the markdown hold it."""

    name: str
    what: str
    status: str = "skipped"
    time_s: float = 0.0
    summary: str = ""
    timings: list[Timing] = field(default_factory=list)
    table: str | None = None
    peak_gpu_memory_gib: float | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# the benchmark rows


def bench_norm(ctx: Context) -> Measurement:
    args = norm_row.parse_args(["--device", str(ctx.device), *ctx.plan.bench_args["norm"]])
    timings = tuple(NormTiming(*line) for line in norm_row.benchmark(args))
    bn, others = timings[0], timings[1:]  # the row times bn first
    ratios = ", ".join(f"{t.norm} {t.ratio_to_bn:.2f}" for t in others)
    return Measurement(
        f"{args.arch} batch {args.batch} x {args.size}px, step time / bn ({bn.step_ms:.1f} ms): {ratios}",
        timings,
        norm_row.format_table([dataclasses.astuple(t) for t in timings], args),
    )


def bench_train(ctx: Context) -> Measurement:
    args = train_row.parse_args(["--device", str(ctx.device), *ctx.plan.bench_args["train"]])
    timings = tuple(TrainTiming(*line) for line in train_row.benchmark(args))
    rates = ", ".join(f"{t.model} {t.images_per_s:.1f} img/s ({t.ratio_to_torchvision:.2f})" for t in timings)
    return Measurement(
        f"RetinaNet {train_row.arch_of(args).name} batch {args.batch} x {args.size}px: {rates}",
        timings,
        train_row.format_table([dataclasses.astuple(t) for t in timings], args),
    )


def bench_infer(ctx: Context) -> Measurement:
    args = infer_row.parse_args(["--device", str(ctx.device), *ctx.plan.bench_args["infer"]])
    lines, (matched, total) = infer_row.benchmark(args)
    timings = tuple(InferTiming(*line) for line in lines)
    fps = ", ".join(f"{t.path} {t.fps:.1f} FPS" for t in timings)
    speedup = next(t.ratio_to_torchvision for t in timings if t.path == "fast")
    return Measurement(
        f"batch 1 x {args.size}px: {fps} (x{speedup:.2f}); detections matched {matched}/{total}",
        timings,
        infer_row.format_table([dataclasses.astuple(t) for t in timings], (matched, total), args),
    )


# ---------------------------------------------------------------------------------------------
# the training runs

TRAIN_NORMS = ("bn", "cbn")


@dataclass(frozen=True)
class Sweep:
    """One ``python -m cbn_detect.train -m ... norm=bn,cbn`` process: a model family's runs."""

    folder: Path
    overrides: list[str]
    returncode: int | None  # None: stopped at its time limit
    wall_s: float
    tail: str


def training_overrides(
    plan: Plan, family: str, norms: Sequence[str], device: torch.device | str, data_root: Path, folder: Path
) -> list[str]:
    """The ``python -m cbn_detect.train -m`` overrides of the family's runs: one job per norm, each
    in ``folder/<norm>``, on synthetic data generated under ``data_root``."""
    return [
        f"model={plan.models[family]}",
        f"norm={','.join(norms)}",
        "data=synthetic",
        f"data.root={data_root}",
        *plan.sizes[family],
        *plan.train,
        f"device={device}",
        "wandb.mode=disabled",
        "train.progress=off",
        "train.resume=never",
        f"hydra.sweep.dir={folder}",
        "hydra.sweep.subdir=${norm.name}",
    ]


def training_sweep(ctx: Context, family: str) -> Sweep:
    """The family's training runs, one job per norm in one process (the interpreter, imports and
    CUDA start once), run when the first of its rows asks and kept for the others. A job that
    fails does not end the sweep (the entry point records it in its ``results.json``)."""
    if family in ctx.sweeps:
        return ctx.sweeps[family]
    norms = [n for n in TRAIN_NORMS if ctx.selected is None or f"train_{family}_{n}" in ctx.selected]
    folder = ctx.work / "runs" / family
    overrides = training_overrides(ctx.plan, family, norms, ctx.device, ctx.work / "data", folder)
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    timeout = max(1.0, min(ctx.plan.run_timeout_s, ctx.remaining_s()))
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", "-m", *overrides],
        cwd=ctx.work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
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


def first_logged_loss(run_dir: Path) -> float | None:
    """The loss of the run's first full metrics record (``train.log_every``), None without one."""
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    return losses[0] if losses else None


def train_run(family: str, norm: str) -> Callable[[Context], Measurement]:
    def measure(ctx: Context) -> Measurement:
        model = ctx.plan.models[family]
        sweep = training_sweep(ctx, family)
        run_dir = sweep.folder / norm
        results = read_results(run_dir)
        if results is None:
            why = "stopped at its time limit" if sweep.returncode is None else f"exit {sweep.returncode}"
            raise NotMeasured(f"{model} {norm}: no results.json ({why}): {sweep.tail[-300:]}")
        run = RunTiming(
            model,
            norm,
            results.status,
            results.steps,
            results.nonfinite_steps,
            first_logged_loss(run_dir),
            results.final_loss,
            results.map_voc07,
            (results.fps or {}).get("fps_model"),
            results.train_time_s,
            results.eval_time_s,
            sweep.wall_s,
            tuple(sweep.overrides),
            results.error,
        )
        summary = run_summary(run, family)
        if run.status != "completed":
            raise NotMeasured(summary)
        return Measurement(summary, (run,), time_s=(run.train_time_s or 0) + (run.eval_time_s or 0))

    return measure


def run_summary(run: RunTiming, family: str) -> str:
    loss = f"{run.first_loss:.3g} -> " if run.first_loss is not None else ""
    loss += "?" if not isinstance(run.final_loss, (int, float)) else f"{run.final_loss:.3g}"
    summary = (
        f"{run.model} {run.norm}: {run.status}, {run.steps} iterations ({run.nonfinite_steps} non-finite), "
        f"loss {loss}, VOC07 mAP {run.map_voc07 or 0:.3f}, {run.fps_model or 0:.1f} FPS; train "
        f"{run.train_time_s or 0:.0f} s + eval {run.eval_time_s or 0:.0f} s (process of the {family} runs: "
        f"{run.sweep_wall_s:.0f} s)"
    )
    if run.error:
        summary += f"; error: {' '.join(str(run.error).split())[:200]}"
    return summary


ROWS: tuple[Row, ...] = (
    Row("bench_norm", "benchmark row norm (trunk training step per norm)", bench_norm),
    Row("bench_train", "benchmark row train (RetinaNet training, ours vs torchvision)", bench_train),
    Row("bench_infer", "benchmark row infer (batch-1 FPS, fast path vs torchvision)", bench_infer),
    Row("train_ssd_bn", "SSD with BN through python -m cbn_detect.train", train_run("ssd", "bn")),
    Row("train_ssd_cbn", "SSD with CBN through python -m cbn_detect.train", train_run("ssd", "cbn")),
    Row("train_retinanet_bn", "RetinaNet with BN through python -m cbn_detect.train", train_run("retinanet", "bn")),
    Row("train_retinanet_cbn", "RetinaNet with CBN through python -m cbn_detect.train", train_run("retinanet", "cbn")),
)


# ---------------------------------------------------------------------------------------------
# running and reporting


def run_row(row: Row, ctx: Context) -> Record:
    record = Record(row.name, row.what)
    if ctx.remaining_s() <= 0:
        record.summary = "skipped: the time budget (--budget-s) ran out"
        return record
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    try:
        measured = row.measure(ctx)
        record.status, record.summary, record.table = "measured", measured.summary, measured.table
        record.timings = list(measured.timings)
        record.time_s = measured.time_s if measured.time_s is not None else time.perf_counter() - start
    except NotMeasured as err:
        record.status, record.summary, record.time_s = "failed", str(err), time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a failing row must not stop the others
        record.status = "failed"
        record.summary = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        record.error = traceback.format_exc()[-4000:]
        record.time_s = time.perf_counter() - start
    if ctx.device.type == "cuda":
        record.peak_gpu_memory_gib = torch.cuda.max_memory_allocated(ctx.device) / 2**30
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


def status_counts(records: list[Record]) -> dict[str, int]:
    return {s: sum(r.status == s for r in records) for s in STATUSES}


def markdown(env: dict[str, Any], records: list[Record], total_s: float) -> str:
    counts = status_counts(records)
    lines = [
        (
            f"# GPU benchmark: {counts['measured']} measured, {counts['failed']} failed, "
            f"{counts['skipped']} skipped ({total_s:.0f} s)"
        ),
        "",
        (
            f"`{env['command']}` on {env['device']}, torch {env['torch']}, torchvision {env['torchvision']}, "
            f"CUDA {env['cuda']}, started {env['started']}{' (tiny CPU sizes)' if env['tiny'] else ''}."
        ),
        "",
        "| row | status | time (s) | result |",
        "| --- | --- | ---: | --- |",
    ]
    for r in records:
        summary = r.summary.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {r.time_s:.1f} | {summary} |")
    lines += ["", "## What each row measures", ""]
    lines += [f"- `{row.name}`: {row.what}" for row in ROWS]
    for r in records:
        if r.table is not None:
            lines += ["", f"## {r.name}", "", "```", r.table, "```"]
    for r in records:
        if r.error:
            lines += ["", f"## {r.name}: traceback", "", "```", r.error.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, env: dict[str, Any], records: list[Record], total_s: float) -> None:
    payload = {**env, "total_s": total_s, **status_counts(records), "rows": [dataclasses.asdict(r) for r in records]}
    io.write_json(out / JSON_NAME, payload)
    io.write_text(out / MARKDOWN_NAME, markdown(env, records, total_s))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cbn_detect.bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU test run")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for {JSON_NAME} and {MARKDOWN_NAME} (default multirun/gpu_bench/<date>_<time>)",
    )
    p.add_argument("--work", type=Path, default=None, help="folder for the training runs (default: a temporary one)")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW", help="run only these rows")
    p.add_argument("--budget-s", type=float, default=None, help="no row starts after this many seconds")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("multirun") / "gpu_bench" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    unknown = set(args.only or []) - {r.name for r in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; valid: {', '.join(r.name for r in ROWS)}")
    return args


def run(argv: list[str]) -> int:
    """Run every row, write the JSON and markdown, print the markdown; 1 if any row failed."""
    args = parse_args(argv)
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    budget = args.budget_s if args.budget_s is not None else plan.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="cbn_gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.device, plan, work.resolve(), time.monotonic() + budget, set(args.only) if args.only else None)
    env = environment(ctx, argv)
    start = time.perf_counter()
    records = [Record(r.name, r.what, summary="not run yet") for r in ROWS]
    try:
        for i, row in enumerate(ROWS):
            if args.only is not None and row.name not in args.only:
                records[i].summary = "skipped: not in --only"
                continue
            records[i] = run_row(row, ctx)
            print(
                f"[gpu bench] {row.name}: {records[i].status} in {records[i].time_s:.1f} s: {records[i].summary}",
                flush=True,
            )
            write_report(args.out, env, records, time.perf_counter() - start)
        write_report(args.out, env, records, time.perf_counter() - start)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(env, records, time.perf_counter() - start))
    return 1 if any(r.status == "failed" for r in records) else 0
