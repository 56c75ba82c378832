"""The composition root: config -> data + model + optimizer -> training -> evaluation -> results.

``python -m cbn_detect.train [overrides]`` runs one point of the study; ``-m`` sweeps a grid, one
job directory per (model, norm, batch, seed). A job that fails records its status in
``results.json`` and the sweep goes on; a job already completed in its directory is skipped, an
interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cbn_detect.data.build import build_dataset, class_names, dataset_problems, train_loader
from cbn_detect.data.errors import DatasetError
from cbn_detect.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cbn_detect.engine.distributed import (
    DistInfo,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    shutdown,
)
from cbn_detect.engine.launch import (
    ProcessesFailed,
    ProcessesInterrupted,
    configure_process_logging,
    run_processes,
    started_by_a_launcher,
)
from cbn_detect.engine.optim import build_optimizer, build_scheduler
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.results import RESULTS_FILE, loss_variance, write_results
from cbn_detect.engine.runtime import resolve_device, seed_everything, set_cudnn_benchmark
from cbn_detect.engine.signals import TrainingInterrupted
from cbn_detect.engine.trainer import Loop, LoopSettings, TrainingDiverged, fit
from cbn_detect.evaluation.evaluator import evaluate, ground_truth
from cbn_detect.evaluation.fps import measure_fps
from cbn_detect.models import build_detector
from cbn_detect.norm import convert_norm, resolve_burnin, use_native_sync_batchnorm
from cbn_detect.tracking import JsonlSink, LoggingSink, MetricSink
from cbn_detect.tracking.wandb_sink import build_wandb_sink

log = logging.getLogger("cbn_detect.train")

USER_ERRORS = (DatasetError, ValueError)
"""Mistakes in the configuration or the data: reported in one line, without a traceback."""


def identity(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "norm": cfg.norm.name,
        "batch": int(cfg.data.batch),
        "world_size": world_size,
        "total_batch": int(cfg.data.batch) * world_size,
        "seed": int(cfg.seed),
        "data": cfg.data.name,
    }


def loop_settings(cfg: DictConfig, progress: bool) -> LoopSettings:
    return LoopSettings(
        epochs=int(cfg.train.epochs),
        max_grad_norm=None if cfg.train.max_grad_norm is None else float(cfg.train.max_grad_norm),
        log_every=int(cfg.train.log_every),
        progress=progress,
        max_nonfinite=int(cfg.train.max_nonfinite),
        loss_window=int(cfg.train.loss_window),
        diagnostics=str(cfg.diagnostics.level),
        diagnostics_every=int(cfg.diagnostics.every),
    )


def show_progress(setting: str, info: DistInfo) -> bool:
    return info.is_main and (setting == "on" or (setting == "auto" and sys.stderr.isatty()))


def completed_results(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    return results if results.get("status") == "completed" else None


def build_model(cfg: DictConfig, num_classes: int, device: torch.device, total_steps: int | None = None) -> nn.Module:
    """The detector with the configured norm, on ``device``, with the speed options applied.

    ``total_steps`` (training iterations per process) turns a fractional ``norm.burnin`` into
    iterations. On CUDA, SyncBN runs as torch's ``nn.SyncBatchNorm`` (same state, fused kernels).
    ``train.compile`` compiles the backbone and head in place (``Module.compile``), which keeps
    parameter names and therefore checkpoints unchanged; torchvision's loss and post-processing
    loop over images with data-dependent shapes and stay eager.
    """
    model = build_detector(cfg.model, num_classes=num_classes)
    norm_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.norm, resolve=True).items() if k != "name"}
    if "burnin" in norm_kwargs:
        norm_kwargs["burnin"] = resolve_burnin(norm_kwargs["burnin"], total_steps)
        log.info("norm %s: plain-BN burn-in of %d iterations", cfg.norm.name, norm_kwargs["burnin"])
    model = convert_norm(model, str(cfg.norm.name), **norm_kwargs).to(device)
    if device.type == "cuda":
        model = use_native_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.backbone.compile()
        model.head.compile()
    return model


BATCH_STATISTICS_NORMS = ("bn", "syncbn", "cbn", "cbn_naive", "brn")
BURNIN_NORMS = ("cbn", "cbn_naive")


class RunSkipped(Exception):
    """The configured norm cannot run at this batch on this model. The job records status
    ``skipped`` with the reason (a sweep's report shows it) instead of failing."""


def _smallest_normalized_map(net: nn.Module, cfg: DictConfig, device: torch.device) -> tuple[int, str]:
    """(values per channel, layer path) of the norm layer that sees the smallest feature map for
    one image at the model's input size."""
    smallest: list[tuple[int, str]] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args, path=path: smallest.append((args[0][0, 0].numel(), path)))
        for path, module in net.named_modules()
        if isinstance(getattr(module, "running_mean", None), torch.Tensor)
    ]
    side = int(cfg.model.get("size", cfg.model.get("min_size", 512)))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net([torch.zeros(3, side, side, device=device)])
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    return min(smallest, default=(2, ""))


def check_batch_statistics(
    net: nn.Module, cfg: DictConfig, device: torch.device, info: DistInfo, total_steps: int
) -> None:
    """Configuration mistakes a norm would only reveal mid-training, caught before it starts.

    A norm that takes statistics over the batch cannot train on a 1x1 feature map with one image:
    it would see one value per channel. SyncBN pools the images of all processes; CBN's plain-BN
    burn-in is BN, but with ``norm.burnin=0`` it pools its window from the first step on.
    """
    name = str(cfg.norm.name)
    if name == "syncbn" and info.world_size == 1:
        log.warning(
            "norm=syncbn in a single process is plain BN; run several processes (processes=N, torchrun, "
            "SLURM tasks) to synchronise"
        )
    images = int(cfg.data.batch) * (info.world_size if name == "syncbn" else 1)
    burnin = resolve_burnin(cfg.norm.burnin, total_steps) if name in BURNIN_NORMS else 0
    if name not in BATCH_STATISTICS_NORMS or images > 1 or (name in BURNIN_NORMS and burnin == 0):
        return
    values, path = _smallest_normalized_map(net, cfg, device)
    if values > 1:
        return
    what = f"its plain-BN burn-in ({burnin} iterations)" if name in BURNIN_NORMS else "its batch statistics"
    advice = "norm.burnin=0, norm=gn" if name in BURNIN_NORMS else "norm=gn, norm=cbn with norm.burnin=0"
    raise RunSkipped(
        f"data.batch=1 with norm={name}: layer {path} normalizes a 1x1 feature map, so {what} would "
        f"come from a single value per channel. Use {advice}, or data.batch >= 2."
    )


def build_sinks(
    cfg: DictConfig, run_dir: Path, state: TrainState, info: DistInfo, wandb_group: str | None
) -> list[MetricSink]:
    if not info.is_main:
        return []
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl", resume_step=state.step), LoggingSink()]
    name = f"{cfg.model.name}-{cfg.norm.name}-b{cfg.data.batch}-s{cfg.seed}"
    wandb_sink = build_wandb_sink(cfg.wandb, OmegaConf.to_container(cfg, resolve=True), name, wandb_group, run_dir)
    if wandb_sink is not None:
        sinks.append(wandb_sink)
    return sinks


def close_sinks(sinks: list[MetricSink], results: dict[str, Any] | None) -> None:
    """The final numbers go into the sinks that keep a summary (W&B) before they close."""
    for sink in sinks:
        if results is not None and hasattr(sink, "summary"):
            sink.summary(results)
        sink.close()


def checkpoint_path(run_dir: Path, info: DistInfo) -> Path:
    """One file per process: CBN's history is per process, and a resume must restore each one's."""
    name = "last.pt" if info.is_main else f"last.rank{info.rank}.pt"
    return run_dir / "checkpoints" / name


def train_summary(state: TrainState) -> dict[str, Any]:
    return {
        "loss_variance": loss_variance(state.epoch_losses),
        "loss_variance_window": loss_variance(state.recent_losses),
        "final_loss": state.epoch_losses[-1] if state.epoch_losses else math.nan,
        "train_time_s": state.train_time_s,
        "epochs": state.epoch,
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_total,
    }


def log_eval(sinks: list[MetricSink], state: TrainState, scores: dict[str, Any] | None) -> None:
    if scores is None:
        return
    record = {"epoch": state.epoch, **{f"eval/{k}": v for k, v in scores.items() if k.startswith("map_")}}
    record.update({f"eval/coco_{k}": v for k, v in scores.get("coco", {}).items()})
    for sink in sinks:
        sink.log(record, state.step)


def run(cfg: DictConfig, run_dir: Path, wandb_group: str | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration into ``run_dir``; returns what ``results.json`` holds
    (on rank 0; other ranks of a distributed run return their status only)."""
    if int(cfg.data.batch) < 1:
        raise ValueError(f"data.batch={cfg.data.batch} must be at least 1 image per process")
    info, device = init_distributed(resolve_device(str(cfg.device)))
    run_dir = Path(broadcast_object(str(run_dir), info))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    set_cudnn_benchmark(bool(cfg.train.cudnn_benchmark))
    precision = Precision(str(cfg.train.amp), device)
    seed_everything(int(cfg.seed) + info.rank)

    classes = class_names(cfg.data)
    train_set = build_dataset(cfg.data, train=True, model_cfg=cfg.model)
    test_set = build_dataset(cfg.data, train=False)
    log.info("data %s: %d training, %d test images", cfg.data.name, len(train_set), len(test_set))

    loader = train_loader(
        train_set, int(cfg.data.batch), int(cfg.data.workers), int(cfg.seed), info.world_size, info.rank
    )
    if len(loader) == 0:
        raise ValueError(
            f"data.batch={cfg.data.batch} x {info.world_size} processes is more than the "
            f"{len(train_set)} training images"
        )
    total_steps = len(loader) * int(cfg.train.epochs)
    net = build_model(cfg, len(classes), device, total_steps)
    check_batch_statistics(net, cfg, device, info, total_steps)
    model = net
    if info.world_size > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    total_batch = int(cfg.data.batch) * info.world_size
    optimizer = build_optimizer(net, cfg.optim, total_batch)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    ckpt = checkpoint_path(run_dir, info)
    state = TrainState()
    if cfg.train.resume == "auto" and ckpt.exists():
        state = load_checkpoint(ckpt, net, optimizer, scheduler, precision)
    sinks = build_sinks(cfg, run_dir, state, info, wandb_group)
    gt = ground_truth(test_set.ground_truth())

    def score() -> dict[str, Any] | None:
        broadcast_buffers(net, info)  # every shard evaluates the weights rank 0 checkpoints
        return evaluate(
            net, test_set, gt, classes, device, info,
            batch=int(cfg.eval.batch), workers=int(cfg.data.workers), metrics=list(cfg.eval.metrics),
            coco=bool(cfg.eval.coco), detections_dir=run_dir / "detections", split=str(cfg.data.test_split),
        )

    def checkpoint() -> None:
        save_checkpoint(ckpt, net, optimizer, scheduler, state, precision)

    def end_of_epoch(state: TrainState) -> None:
        checkpoint()
        every = int(cfg.eval.every)
        if every > 0 and state.epoch % every == 0 and state.epoch < int(cfg.train.epochs):
            log_eval(sinks, state, score())

    try:
        settings = loop_settings(cfg, show_progress(str(cfg.train.progress), info))
        loop = Loop(model, loader, optimizer, scheduler, device, settings, sinks, checkpoint, precision)
        state = fit(loop, state, end_of_epoch)
    except TrainingDiverged as err:
        log.error("%s", err)
        results = {"status": "diverged", **identity(cfg, info.world_size), "error": str(err), **train_summary(state)}
        if info.is_main:
            write_results(run_dir, results)
        close_sinks(sinks, results)
        return results

    start = time.perf_counter()
    scores = score()
    eval_time = time.perf_counter() - start
    log_eval(sinks, state, scores)
    if not info.is_main or scores is None:
        close_sinks(sinks, None)
        return {"status": "completed"}
    fps = measure_fps(net, test_set, device, int(cfg.eval.fps_images), int(cfg.eval.fps_warmup))
    results = {
        "status": "completed",
        **identity(cfg, info.world_size),
        **{k: v for k, v in scores.items() if k != "num_detections"},
        "fps": fps,
        **train_summary(state),
        "eval_time_s": eval_time,
        "num_detections": scores["num_detections"],
        "data_problems": {"train": dataset_problems(train_set), "test": dataset_problems(test_set)},
        "device": str(device),
        "amp": str(cfg.train.amp),
        "torch": torch.__version__,
    }
    write_results(run_dir, results)
    close_sinks(sinks, results)
    log.info(
        "%s %s batch %d: VOC07 mAP %.4f, loss variance %.4g, %.1f FPS -> %s",
        results["model"], results["norm"], results["batch"], results.get("map_voc07", math.nan),
        results["loss_variance"], fps["fps_model"], run_dir,
    )
    return results


def record_failure(
    cfg: DictConfig, run_dir: Path, error: str, status: str = "failed", world_size: int | None = None
) -> None:
    """A job that did not complete still leaves a results.json, so the report lists it instead of
    dropping it; a skipped job keeps its reason. (Rank 0 alone writes: the processes of a
    distributed run share the directory.)"""
    if os.environ.get("RANK", "0") != "0":
        return
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    write_results(run_dir, {"status": status, **identity(cfg, world_size), "reason" if status == "skipped" else "error": error})


@dataclass(frozen=True)
class Outcome:
    """How a job (or one of its processes) ended: its status, the sweep's metric, the exit code."""

    status: str
    metric: float = math.nan
    exit_code: int = 0


def run_job(cfg: DictConfig, run_dir: Path, wandb_group: str | None) -> Outcome:
    """``run`` with every way it can end turned into a status in ``results.json`` and an exit code:
    a skipped norm is not an error (0), a user error is one line (2), anything else keeps its
    traceback (1), an interrupt exits as the signal would (128 + signum)."""
    try:
        results = run(cfg, run_dir, wandb_group)
    except RunSkipped as err:
        log.warning("skipped: %s", err)
        record_failure(cfg, run_dir, str(err), status="skipped")
        return Outcome("skipped")
    except TrainingInterrupted as err:
        log.warning("%s", err)
        record_failure(cfg, run_dir, str(err), status="interrupted")
        return Outcome("interrupted", exit_code=128 + err.signum)
    except USER_ERRORS as err:
        log.error("%s", err)
        record_failure(cfg, run_dir, str(err))
        return Outcome("failed", exit_code=2)
    except Exception as err:
        log.exception("the run failed")
        record_failure(cfg, run_dir, f"{type(err).__name__}: {err}")
        return Outcome("failed", exit_code=1)
    finally:
        shutdown()
    return Outcome(str(results["status"]), float(results.get("map_voc07", math.nan)))


def _process_main(cfg: DictConfig, run_dir: Path, wandb_group: str | None, logging_config: dict | None) -> Outcome:
    """One of the ``processes=N`` workers. A failing worker exits non-zero, so that the launcher
    stops the others instead of leaving them waiting in a collective."""
    configure_process_logging(logging_config, int(os.environ["RANK"]))
    if cfg.threads is None:  # as torchrun's OMP_NUM_THREADS=1: N processes x all cores thrash the CPU
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    outcome = run_job(cfg, run_dir, wandb_group)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)
    return outcome


def _results_written_since(run_dir: Path, start: float) -> bool:
    path = run_dir / RESULTS_FILE
    return path.exists() and path.stat().st_mtime >= start


def launch_job(cfg: DictConfig, run_dir: Path, wandb_group: str | None, logging_config: dict | None) -> Outcome:
    """The job as ``processes`` DDP processes on this machine; rank 0's outcome. A job whose
    processes died before rank 0 could say so still gets its results.json here."""
    count = int(cfg.processes)
    start = time.time()
    try:
        return run_processes(count, _process_main, cfg, run_dir, wandb_group, logging_config)[0]
    except ProcessesFailed as err:
        log.error("%s", err)
        if not _results_written_since(run_dir, start):
            record_failure(cfg, run_dir, str(err), world_size=count)
        return Outcome("failed", exit_code=2 if set(err.exit_codes.values()) == {2} else 1)
    except ProcessesInterrupted as err:
        log.warning("%s; rerun the same command to resume", err)
        if not _results_written_since(run_dir, start):
            record_failure(cfg, run_dir, str(err), status="interrupted", world_size=count)
        return Outcome("interrupted", exit_code=128 + err.signum)


def _several_processes(cfg: DictConfig) -> bool:
    """Whether this command must start the job's processes itself (``processes`` > 1)."""
    count = int(cfg.processes)
    if count > 1 and started_by_a_launcher():
        log.warning("processes=%d ignored: this process was started as one of several (torchrun or SLURM tasks)", count)
        return False
    return count > 1


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    previous = completed_results(run_dir) if cfg.train.resume == "auto" else None
    if previous is not None:
        log.info("%s already holds a completed run; skipping it (train.resume=never starts over)", run_dir)
        return float(previous.get("map_voc07", math.nan))
    # The sweep folder's last two parts (<date>/<time> by default) name the W&B group.
    wandb_group = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
    if int(cfg.processes) < 1:
        log.error("processes=%s must be at least 1", cfg.processes)
        sys.exit(2)
    if _several_processes(cfg):
        logging_config = OmegaConf.to_container(hydra_cfg.job_logging, resolve=True)
        outcome = launch_job(cfg, run_dir, wandb_group, logging_config)
    else:
        outcome = run_job(cfg, run_dir, wandb_group)
    # An interrupt stops a whole sweep (SLURM requeues it); any other failure only its own job.
    if outcome.exit_code and (outcome.status == "interrupted" or not multirun):
        sys.exit(outcome.exit_code)
    return outcome.metric


if __name__ == "__main__":
    main()
