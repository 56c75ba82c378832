"""The composition root: config -> data + model + optimizer -> training -> evaluation -> results.

``python -m cbn_detect.train [overrides]`` runs one point of the study; ``-m`` sweeps a grid, one
job directory per (model, norm, batch, seed). A job that fails records its status in
``results.json`` and the sweep goes on; a job already completed in its directory is skipped, an
interrupted one resumes from its checkpoint. ``run`` is three steps: ``setup`` assembles a
:class:`Run`, ``train`` fits it, ``finish`` evaluates it and writes the results.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from cbn_detect.data.build import build_dataset, class_names, dataset_problems, train_loader
from cbn_detect.engine.build import build_model
from cbn_detect.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cbn_detect.engine.hooks import (
    DiagnosticsHook,
    EpochCheckpoint,
    EvaluationWriter,
    HookBase,
    JobLockRefresh,
    MetricsWriter,
    PeriodicEvaluation,
    ProgressHook,
    Scores,
    SlowRunCheck,
    log_eval,
)
from cbn_detect.engine.loss_stats import loss_variance
from cbn_detect.engine.optim import build_optimizer, build_scheduler
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.preflight import check_batch_statistics
from cbn_detect.engine.signals import HANDLED, TrainingInterrupted
from cbn_detect.engine.trainer import Loop, LoopSettings, TrainingDiverged, fit
from cbn_detect.evaluation.evaluator import evaluate
from cbn_detect.evaluation.fps import measure_fps
from cbn_detect.evaluation.pictures import load_examples, pick_images
from cbn_detect.jobs import identity, launch_job, launches_processes, run_job
from cbn_detect.models.fold import inference_copy
from cbn_detect.norm import resolve_burnin
from cbn_detect.overrides import refuse_unknown_overrides
from cbn_detect.results import Results, completed_results, write_results
from cbn_detect.runtime import (
    DistInfo,
    broadcast_buffers,
    broadcast_object,
    gather_objects,
    init_distributed,
    resolve_device,
    seed_everything,
    set_cudnn_benchmark,
)
from cbn_detect.runtime.errors import CheckpointError, ConfigError
from cbn_detect.runtime.lock import JobLock, claim_job
from cbn_detect.runtime.phases import phase
from cbn_detect.runtime.progress import ProgressSettings
from cbn_detect.settings import RunSettings, loop_settings
from cbn_detect.tracking import DetectionPicture, JsonlSink, LoggingSink, MetricSink
from cbn_detect.tracking.wandb_sink import build_wandb_sink
from cbn_detect.voc import GroundTruth

log = logging.getLogger("cbn_detect.train")


def build_sinks(
    cfg: DictConfig, run_dir: Path, state: TrainState, info: DistInfo, wandb_group: str | None
) -> list[MetricSink]:
    if not info.is_main:
        return []
    sinks: list[MetricSink] = [
        JsonlSink(run_dir / "metrics.jsonl", resume_step=state.step),
        LoggingSink(full=bool(cfg.diagnostics.console)),
    ]
    name = f"{cfg.model.name}-{cfg.norm.name}-b{cfg.data.batch}-s{cfg.seed}"
    wandb_sink = build_wandb_sink(
        cfg.wandb, OmegaConf.to_container(cfg, resolve=True), name, wandb_group, run_dir, resume=state.step > 0
    )
    if wandb_sink is not None:
        sinks.append(wandb_sink)
    return sinks


def close_sinks(sinks: list[MetricSink], results: Results | None) -> None:
    """The final numbers go into the sinks that keep a summary (W&B) before they close. Every sink
    is closed even when another one fails to; such a failure is a warning, never an exception that
    would hide how the run ended."""
    summary = None if results is None else results.to_dict()
    for sink in sinks:
        try:
            if summary is not None:
                sink.summary(summary)
            sink.close()
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("closing %s failed (%s: %s)", type(sink).__name__, type(err).__name__, err)


def release_lock(lock: JobLock | None) -> None:
    """The job's lock goes last, once the sinks have written everything; failing to remove it is a
    warning, as for a sink (a lock left behind is taken over as this process's own, or as stale)."""
    if lock is None:
        return
    try:
        lock.release()
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("releasing %s failed (%s: %s)", lock.path, type(err).__name__, err)


def job_name(cfg: DictConfig) -> str:
    """``retinanet_tiny/bn/b4/s0``: the job in progress lines when several jobs share a console."""
    return f"{cfg.model.name}/{cfg.norm.name}/b{cfg.data.batch}/s{cfg.seed}"


def completed_in(run_dir: Path) -> bool:
    return completed_results(run_dir, warn=False) is not None  # main() warned about an unreadable one


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


@dataclass
class Run:
    """What ``setup`` assembles for one run: everything ``train`` and ``finish`` use."""

    cfg: DictConfig
    settings: RunSettings
    info: DistInfo
    device: torch.device
    run_dir: Path
    precision: Precision
    classes: tuple[str, ...]
    train_set: Dataset
    test_set: Dataset
    gt: GroundTruth
    loader: DataLoader
    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    sinks: list[MetricSink]
    progress: ProgressSettings
    lock: JobLock | None
    """This job's lock (rank 0 only): refreshed by a hook while training, released when the run ends."""

    def identity(self) -> dict[str, Any]:
        return identity(self.cfg, self.info.world_size)

    def checkpoint(self) -> None:
        save_checkpoint(
            checkpoint_path(self.run_dir, self.info),
            self.net,
            self.optimizer,
            self.scheduler,
            self.state,
            self.precision,
            config=OmegaConf.to_container(self.cfg, resolve=False),  # evaluable on its own
        )

    def score(self) -> Scores | None:
        """Evaluate the current weights (sharded over the processes; rank 0 gets the scores) on
        the fast path: an inference copy with the norms folded into their convs, the network
        itself left as it is."""
        s = self.settings
        broadcast_buffers(self.net, self.info)  # every shard evaluates the weights rank 0 checkpoints
        return evaluate(
            inference_copy(self.net),
            self.test_set,
            self.gt,
            self.classes,
            self.device,
            self.info,
            batch=s.eval_batch,
            workers=s.workers,
            metrics=list(s.metrics),
            coco=s.coco,
            detections_dir=self.run_dir / "detections",
            split=s.test_split,
            progress=self.progress,
        )

    def log_pictures(self) -> None:
        """``eval.log_images`` test images with their ground truth and the detections of the evaluation
        just written (read back from its devkit files, as the report draws them) to the sinks that
        show images (W&B), at the current step. As everything for W&B, it never stops the run: a
        failure is one warning."""
        if self.settings.log_images < 1 or not any(sink.draws for sink in self.sinks):
            return
        try:
            examples = load_examples(
                self.test_set,
                self.gt,
                self.run_dir / "detections",
                self.settings.test_split,
                self.classes,
                pick_images(self.gt, self.settings.log_images),
                self.settings.image_score,
            )
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("no detection images for W&B (%s: %s)", type(err).__name__, err)
            return
        pictures = [
            DetectionPicture(
                image=np.ascontiguousarray(e.image.permute(1, 2, 0).numpy()),
                caption=e.image_id,
                gt_boxes=e.gt_boxes,
                gt_labels=e.gt_labels,
                gt_difficult=e.gt_difficult,
                boxes=e.boxes,
                scores=e.scores,
                labels=e.labels,
            )
            for e in examples
        ]
        for sink in self.sinks:
            sink.log_detections("eval/examples", pictures, self.classes, self.state.step)


def setup_data(
    cfg: DictConfig, settings: RunSettings, info: DistInfo
) -> tuple[tuple[str, ...], Dataset, Dataset, DataLoader]:
    classes = class_names(cfg.data)
    train_set = build_dataset(cfg.data, train=True, transforms=instantiate(cfg.augment))
    test_set = build_dataset(cfg.data, train=False)
    log.info("data %s: %d training, %d test images", cfg.data.name, len(train_set), len(test_set))
    loader = train_loader(train_set, settings.batch, settings.workers, settings.seed, info.world_size, info.rank)
    if len(loader) == 0:
        raise ConfigError(
            f"data.batch={settings.batch} x {info.world_size} processes is more than the "
            f"{len(train_set)} training images"
        )
    return classes, train_set, test_set, loader


def setup_model(cfg: DictConfig, info: DistInfo, device: torch.device, num_classes: int, total_steps: int) -> nn.Module:
    """The network, checked for a norm that cannot run at this batch (not yet wrapped: see
    :func:`wrap_model`)."""
    net = build_model(cfg, num_classes, device, total_steps)
    burnin = resolve_burnin(cfg.norm.burnin, total_steps) if "burnin" in cfg.norm else 0
    side = int(cfg.model.get("size", cfg.model.get("min_size", 512)))
    check_batch_statistics(net, str(cfg.norm.name), int(cfg.data.batch), info.world_size, burnin, side, device)
    return net


def wrap_model(net: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP's wrapper of the network (itself in one process). Only once the checkpoint is loaded:
    DDP's constructor broadcasts rank 0's parameters and buffers, so every process starts (or
    resumes) from the same weights."""
    if info.world_size == 1:
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def resume(
    settings: RunSettings,
    run_dir: Path,
    info: DistInfo,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
) -> TrainState:
    """Each process's checkpoint loaded into its network (before the DDP wrap), or a fresh state.

    Every process must resume from the same step (or all start over): per-process checkpoints of
    different steps, or only some processes having one, are a :class:`CheckpointError` naming the
    files, raised on every process alike (as is one process's unreadable checkpoint)."""
    path = checkpoint_path(run_dir, info)
    state, step, problem = TrainState(), None, None
    if settings.resume == "auto" and path.exists():
        try:
            state = load_checkpoint(path, net, optimizer, scheduler, precision)
            step = state.step
        except CheckpointError as err:
            problem = str(err)
    found = gather_objects((str(path), step, problem), info)
    problems = [p for _, _, p in found if p is not None]
    if problems:
        raise CheckpointError(problems[0])
    if len({s for _, s, _ in found}) > 1:
        listed = ", ".join(f"{p} at step {s}" if s is not None else f"{p} missing" for p, s, _ in found)
        raise CheckpointError(
            f"the processes' checkpoints are of different steps ({listed}) and cannot resume one run; "
            "move them away, or rerun with train.resume=never to start over"
        )
    return state


def setup(cfg: DictConfig, run_dir: Path, wandb_group: str | None, several_jobs: bool = False) -> Run:
    """Process group, seeds, data, model, optimizer and schedule, the checkpoint to resume from, sinks.
    ``several_jobs``: the job shares its console with others (a multirun), so its progress lines
    carry its name (as they do when the job runs as several processes)."""
    settings = RunSettings.from_config(cfg)
    if settings.batch < 1:
        raise ConfigError(f"data.batch={settings.batch} must be at least 1 image per process")
    progress = ProgressSettings.resolve(settings.progress, settings.progress_every_s)  # a bad value fails first
    info, device = init_distributed(resolve_device(settings.device))
    progress = replace(
        progress,
        mode=progress.mode if info.is_main else "off",
        name=job_name(cfg) if several_jobs or info.world_size > 1 else "",
    )
    run_dir = Path(broadcast_object(str(run_dir), info))
    # One writer per job directory: rank 0 holds job.lock (or all ranks raise JobLocked and skip).
    lock = claim_job(run_dir, info, float(cfg.train.lock_stale_h), finished=lambda: completed_in(run_dir))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_cudnn_benchmark(settings.cudnn_benchmark)
    precision = Precision(settings.amp, device)
    seed_everything(settings.seed + info.rank)
    classes, train_set, test_set, loader = setup_data(cfg, settings, info)
    total_steps = len(loader) * settings.epochs
    net = setup_model(cfg, info, device, len(classes), total_steps)
    optimizer = build_optimizer(net, cfg.optim, settings.batch * info.world_size)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    state = resume(settings, run_dir, info, net, optimizer, scheduler, precision)
    model = wrap_model(net, info, device)
    gt = test_set.ground_truth()
    with phase("logging"):
        sinks = build_sinks(cfg, run_dir, state, info, wandb_group)  # last: from here on run() closes them
    return Run(
        cfg,
        settings,
        info,
        device,
        run_dir,
        precision,
        classes,
        train_set,
        test_set,
        gt,
        loader,
        net,
        model,
        optimizer,
        scheduler,
        state,
        sinks,
        progress,
        lock,
    )


def build_hooks(run: Run, settings: LoopSettings) -> list[HookBase]:
    """What the run does around its training steps, in the order it happens at each step and each
    epoch's end: diagnostics before the step's record (metrics.jsonl keeps that order), the
    checkpoint before an evaluation, the lock refreshed after all of them."""
    slow = SlowRunCheck(settings.slow_warning_h, run.device.type, settings.progress.name)
    found: list[HookBase] = []
    if settings.diagnostics != "off":
        found.append(DiagnosticsHook(run.net, run.sinks, settings.diagnostics, settings.diagnostics_every))
    found += [
        ProgressHook(settings.progress, settings.epochs, run.info.world_size, slow),
        MetricsWriter(run.sinks, settings.log_every, run.device, run.optimizer),
        EpochCheckpoint(run.checkpoint),
    ]
    if run.settings.eval_every > 0:
        evaluation = PeriodicEvaluation(run.score, run.settings.eval_every, settings.epochs)
        found += [evaluation, EvaluationWriter(evaluation, run.sinks, run.log_pictures)]
    if run.lock is not None:
        found.append(JobLockRefresh(run.lock))
    return found


def train(run: Run) -> None:
    """Fit from the run's state to ``train.epochs``, checkpointing (and evaluating every
    ``eval.every`` epochs) at each epoch's end."""
    slow_warning_h = run.settings.slow_warning_h if run.info.is_main else None
    settings = loop_settings(run.cfg, run.progress, slow_warning_h)
    loop = Loop(
        run.model,
        run.loader,
        run.optimizer,
        run.scheduler,
        run.device,
        settings,
        run.sinks,
        run.checkpoint,
        run.precision,
    )
    fit(loop, run.state, build_hooks(run, settings))


def finish_diverged(run: Run, err: TrainingDiverged) -> Results:
    log.error("%s", err)
    results = Results(status="diverged", **run.identity(), error=str(err), **train_summary(run.state))
    if run.info.is_main:
        write_results(run.run_dir, results)
    return results


class _SignalStop(BaseException):
    """What :func:`stop_on_signals`' handler raises: a BaseException, as KeyboardInterrupt is, so
    that no ``except Exception`` it passes through (logging's own, W&B's guard) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_on_signals(step: int) -> Iterator[None]:
    """Inside, SIGTERM, SIGUSR1 and SIGUSR2 stop the run at once as interrupted
    (:class:`TrainingInterrupted`: status ``interrupted``, exit code 128 + signum), where their
    default action would kill the process without a word. For the final evaluation and FPS: the
    trained weights are checkpointed already, so nothing is lost and a rerun evaluates them. A
    signal someone else handles (submitit's requeue) is left to that handler."""
    received: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        if not received:  # a second signal while the first unwinds changes nothing
            received.append(signum)
            raise _SignalStop(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            if signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, stop)
    try:
        yield
    except _SignalStop as err:
        log.warning("received %s during the final evaluation; stopping", signal.Signals(err.signum).name)
        raise TrainingInterrupted(err.signum, step) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def finish(run: Run) -> Results:
    """The final evaluation and FPS, written to ``results.json`` by rank 0 (which returns them;
    other ranks return their status only). A signal during them ends the run as interrupted
    (:func:`stop_on_signals`); once the results are being written, it no longer does."""
    s = run.settings
    with stop_on_signals(run.state.step):
        log.info("final evaluation on %d test images", len(run.test_set))
        start = time.perf_counter()
        with phase("evaluation"):
            scores = run.score()
        eval_time = time.perf_counter() - start
        with phase("logging"):
            log_eval(run.sinks, run.state, scores)
            if run.lock is not None:
                run.lock.refresh_if_due()
        if not run.info.is_main or scores is None:
            return Results(status="completed", **run.identity())
        with phase("logging"):
            run.log_pictures()
        with phase("fps"):
            fps = measure_fps(
                inference_copy(run.net), run.test_set, run.device, s.fps_images, s.fps_warmup, progress=run.progress
            )
    results = Results(
        status="completed",
        **run.identity(),
        dataset_dir=str(run.test_set.root.absolute()),
        test_split=s.test_split,
        **scores,
        fps=fps,
        **train_summary(run.state),
        eval_time_s=eval_time,
        data_problems={"train": dataset_problems(run.train_set), "test": dataset_problems(run.test_set)},
        device=str(run.device),
        amp=s.amp,
        torch=torch.__version__,
    )
    with phase("logging"):
        write_results(run.run_dir, results)
    log.info(
        "%s %s batch %d: VOC07 mAP %.4f, loss variance %.4g, %.1f FPS -> %s",
        results.model,
        results.norm,
        results.batch,
        math.nan if results.map_voc07 is None else results.map_voc07,
        results.loss_variance,
        results.fps["fps_model"],
        run.run_dir,
    )
    return results


def run(cfg: DictConfig, run_dir: Path, wandb_group: str | None = None, several_jobs: bool = False) -> Results:
    """Train and evaluate one configuration into ``run_dir``. However it ends (completed, diverged,
    interrupted, failed), its sinks are closed once setup has built them: W&B finishes,
    ``metrics.jsonl`` is closed (with the final numbers when there are); then the job's lock is released.
    ``several_jobs``: its console is shared with other jobs (a multirun; see :func:`setup`)."""
    with phase("setup"):
        job = setup(cfg, run_dir, wandb_group, several_jobs)
    results: Results | None = None
    try:
        try:
            train(job)
        except TrainingDiverged as err:
            results = finish_diverged(job, err)
        else:
            results = finish(job)
    finally:
        with phase("logging"):
            close_sinks(job.sinks, results)
            release_lock(job.lock)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    previous = completed_results(run_dir) if cfg.train.resume == "auto" else None  # unreadable: warned, redone
    if previous is not None:
        log.info("%s already holds a completed run; skipping it (train.resume=never starts over)", run_dir)
        return math.nan if previous.map_voc07 is None else float(previous.map_voc07)
    # The sweep folder's last two parts (<date>/<time> by default) name the W&B group.
    wandb_group = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
    try:
        several = launches_processes(cfg)
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)
    one_job = functools.partial(run, several_jobs=multirun)  # a multirun's jobs name themselves in progress lines
    if several:
        logging_config = OmegaConf.to_container(hydra_cfg.job_logging, resolve=True)
        outcome = launch_job(one_job, cfg, run_dir, wandb_group, logging_config)
    else:
        outcome = run_job(one_job, cfg, run_dir, wandb_group)
    # An interrupt stops a whole sweep (SLURM requeues it); any other failure only its own job.
    if outcome.exit_code and (outcome.status == "interrupted" or not multirun):
        sys.exit(outcome.exit_code)
    return outcome.metric


def cli() -> None:
    """``python -m cbn_detect.train``: a misspelt key or group option is refused in one line with
    exit code 2 before Hydra runs anything (``cbn_detect.overrides``: Hydra's own answer is a
    multi-line error whose ``+key`` hint trains with the key ignored); then Hydra takes over."""
    refuse_unknown_overrides("cbn_detect.train")
    main()


if __name__ == "__main__":
    cli()
