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
from cbn_detect.engine.optim import build_optimizer, build_scheduler
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.results import RESULTS_FILE, loss_variance, write_results
from cbn_detect.engine.runtime import resolve_device, seed_everything, set_cudnn_benchmark
from cbn_detect.engine.signals import TrainingInterrupted
from cbn_detect.engine.trainer import Loop, LoopSettings, TrainingDiverged, fit
from cbn_detect.evaluation.evaluator import evaluate, ground_truth
from cbn_detect.evaluation.fps import measure_fps
from cbn_detect.models import build_detector
from cbn_detect.norm import convert_norm
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


def build_model(cfg: DictConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The detector with the configured norm, on ``device``, with the speed options applied.

    ``train.compile`` compiles the backbone and head in place (``Module.compile``), which keeps
    parameter names and therefore checkpoints unchanged; torchvision's loss and post-processing
    loop over images with data-dependent shapes and stay eager.
    """
    model = build_detector(cfg.model, num_classes=num_classes)
    norm_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.norm, resolve=True).items() if k != "name"}
    model = convert_norm(model, str(cfg.norm.name), **norm_kwargs).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.backbone.compile()
        model.head.compile()
    return model


BATCH_STATISTICS_NORMS = ("bn", "syncbn", "cbn", "cbn_naive", "brn")


@torch.no_grad()
def check_batch_statistics(net: nn.Module, cfg: DictConfig, device: torch.device, info: DistInfo) -> None:
    """Configuration mistakes a norm would only reveal mid-training, caught before it starts."""
    name = str(cfg.norm.name)
    if name == "syncbn" and info.world_size == 1:
        log.warning("norm=syncbn in a single process is plain BN; start several (torchrun, SLURM tasks) to synchronise")
    if name not in BATCH_STATISTICS_NORMS or int(cfg.data.batch) > 1:
        return
    # With one image per process, a norm after a 1x1 feature map sees one value per channel.
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
        net([torch.zeros(3, side, side, device=device)])
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    values, path = min(smallest, default=(2, ""))
    if values == 1:
        raise ValueError(
            f"data.batch=1 with norm={name}: layer {path} normalizes a 1x1 feature map, so its batch "
            "statistics would come from a single value per channel. Use norm=gn or norm=cbn (which "
            "averages over iterations), or data.batch >= 2."
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

    net = build_model(cfg, len(classes), device)
    check_batch_statistics(net, cfg, device, info)
    model = net
    if info.world_size > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    loader = train_loader(
        train_set, int(cfg.data.batch), int(cfg.data.workers), int(cfg.seed), info.world_size, info.rank
    )
    if len(loader) == 0:
        raise ValueError(
            f"data.batch={cfg.data.batch} x {info.world_size} processes is more than the "
            f"{len(train_set)} training images"
        )
    total_batch = int(cfg.data.batch) * info.world_size
    optimizer = build_optimizer(net, cfg.optim, total_batch)
    scheduler = build_scheduler(optimizer, cfg.optim, len(loader) * int(cfg.train.epochs))

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


def record_failure(cfg: DictConfig, run_dir: Path, error: str, status: str = "failed") -> None:
    """A failed job still leaves a results.json, so the report lists it instead of dropping it.
    (Rank 0 alone writes: the processes of a distributed run share the directory.)"""
    if os.environ.get("RANK", "0") != "0":
        return
    write_results(run_dir, {"status": status, **identity(cfg, 1), "error": error})


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
    try:
        results = run(cfg, run_dir, wandb_group)
    except TrainingInterrupted as err:
        log.warning("%s", err)
        record_failure(cfg, run_dir, str(err), status="interrupted")
        sys.exit(128 + err.signum)
    except USER_ERRORS as err:
        log.error("%s", err)
        record_failure(cfg, run_dir, str(err))
        if multirun:
            return math.nan
        sys.exit(2)
    except Exception as err:
        log.exception("the run failed")
        record_failure(cfg, run_dir, f"{type(err).__name__}: {err}")
        if multirun:
            return math.nan
        raise
    finally:
        shutdown()
    return float(results.get("map_voc07", math.nan))


if __name__ == "__main__":
    main()
