"""Evaluate a trained run again: ``python -m cbn_detect.evaluate <run_dir | checkpoint> [overrides]``.

The model is rebuilt from the run's own configuration (``<run_dir>/.hydra/config.yaml``; for a
checkpoint path, its run folder is ``<checkpoint>/../..``), the weights are loaded from
``checkpoints/last.pt`` (or the checkpoint given), and the test split is scored exactly as at the
end of training (``evaluation.evaluator.evaluate`` on the same fast path, the norms folded into
their convs by ``models.fold.inference_copy``): VOC07 and area mAP, AP per class, COCO AP, the
devkit-format detection files, and FPS. Hydra-style overrides change what is evaluated, not the
model: ``data.test_split=val``, ``data.root=/other/VOCdevkit``, ``data=voc07`` (another dataset
with as many classes), ``eval.fps_images=0`` (no FPS), ``eval.coco=false``, ``device=cpu``.

Writes ``<run_dir>/eval_<split>.json`` (strict JSON) and the detections to
``<run_dir>/eval_<split>/``; ``results.json`` and the run's own ``detections/`` are left alone.

Started as several processes (``torchrun --nproc_per_node=N -m cbn_detect.evaluate ...``, SLURM
tasks, or ``processes=N`` on the command line), each process scores its shard of the split and
rank 0 gathers them, so the numbers equal a one-process evaluation. ``processes`` defaults to 1
whatever the training used. Exit status: 0 done, 2 a problem named in one line (no run folder, no
checkpoint, a bad override, a missing dataset), 1 anything else (with its traceback).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbn_detect.data.build import build_dataset, class_names
from cbn_detect.evaluation.evaluator import evaluate
from cbn_detect.evaluation.fps import measure_fps
from cbn_detect.models.fold import inference_copy
from cbn_detect.runtime import (
    ProcessesFailed,
    configure_process_logging,
    init_distributed,
    io,
    resolve_device,
    run_processes,
    shutdown,
    started_by_a_launcher,
)
from cbn_detect.runtime.errors import CheckpointError, ConfigError, ReportedError
from cbn_detect.train import RunSettings, build_model
from cbn_detect.voc import DatasetError

log = logging.getLogger("cbn_detect.evaluate")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
RUN_CONFIG = Path(".hydra") / "config.yaml"
CHECKPOINT = Path("checkpoints") / "last.pt"
SWITCHABLE_GROUPS = ("data",)
"""The config groups an evaluation may switch (``data=voc07``: another test set). The checkpoint's
weights fix the model and its norm, and the training settings play no part in scoring."""

LOGGING = {
    "version": 1,
    "formatters": {"simple": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "stream": "ext://sys.stdout"}},
    "root": {"level": "INFO", "handlers": ["console"]},
    "disable_existing_loggers": False,
}
"""Progress on stdout, so that stderr holds nothing but the one line of a failure."""

USER_ERRORS = (ReportedError, DatasetError, HydraException, OmegaConfBaseException)


def eval_file(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / f"eval_{split}.json"


def locate(target: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of a run folder or of a checkpoint file inside one."""
    target = Path(target)
    if target.is_file():
        run_dir, checkpoint = target.parent.parent, target
    elif target.is_dir():
        run_dir, checkpoint = target, target / CHECKPOINT
    else:
        raise ConfigError(f"{target}: no such run folder or checkpoint")
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(
            f"{target}: not a run of cbn_detect.train ({run_dir / RUN_CONFIG} not found); give the folder a "
            "run wrote (it holds .hydra/ and checkpoints/) or its checkpoints/last.pt"
        )
    if not checkpoint.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint to evaluate ({checkpoint} not found; did the run train an epoch?)")
    return run_dir, checkpoint


def _group_option(group: str, option: str) -> DictConfig:
    """The ``group`` node of the default config composed with ``group=option`` (conf/ as training)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"{group}={option}"])[group]


def _is_group(override: Override) -> bool:
    key = override.key_or_group
    return "." not in key and (CONFIG_DIR / key).is_dir()


_ABSENT = object()


def load_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's saved configuration with ``overrides`` applied (Hydra's syntax: ``key=value``,
    ``+key=value`` for a new key, ``data=<option>``); ``processes`` is 1 unless overridden."""
    cfg = OmegaConf.load(Path(run_dir) / RUN_CONFIG)
    cfg.processes = 1
    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    for override in sorted(parsed, key=lambda o: not _is_group(o)):  # group choices first, as Hydra
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: evaluate takes one value per key, not a sweep")
        if _is_group(override):
            if key not in SWITCHABLE_GROUPS or override.is_delete():
                raise ConfigError(
                    f"{override.input_line}: the checkpoint fixes the model ({cfg.model.name} with {cfg.norm.name}); "
                    "only data=<option> and key=value overrides change what is evaluated"
                )
            cfg[key] = _group_option(key, str(override.value()))
            continue
        exists = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT
        if override.is_delete():
            raise ConfigError(f"{override.input_line}: deleting keys is not supported here")
        if not exists and not (override.is_add() or override.is_force_add()):
            raise ConfigError(f"{override.input_line}: the run's config has no key {key} (+{key}=... adds one)")
        OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    OmegaConf.resolve(cfg)  # interpolations (the cache folder from $CBN_DETECT_CACHE, ...) resolve here
    return cfg


def _load_weights(checkpoint: Path) -> dict[str, Any]:
    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {checkpoint} ({type(err).__name__}: {first})") from err
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{checkpoint} is not a cbn_detect checkpoint (no 'model' weights in it)")
    return payload


def evaluate_run(
    cfg: DictConfig, run_dir: Path, checkpoint: Path, overrides: list[str] | None = None
) -> dict[str, Any] | None:
    """Score the checkpoint on the configured test split; rank 0 writes ``eval_<split>.json`` and
    returns its content (other ranks return None). ``overrides`` are recorded with the scores."""
    settings = RunSettings.from_config(cfg)
    info, device = init_distributed(resolve_device(settings.device))
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        classes = class_names(cfg.data)
        test_set = build_dataset(cfg.data, train=False)
        payload = _load_weights(checkpoint)
        state = payload.get("state") or {}
        net = build_model(cfg, len(classes), device, total_steps=max(1, int(state.get("step") or 1)))
        try:
            net.load_state_dict(payload["model"])
        except RuntimeError as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"{checkpoint} does not fit {cfg.model.name} with {cfg.norm.name} and the {len(classes)} classes of "
                f"data {cfg.data.name} ({first}); evaluate it on a dataset with the classes it was trained on"
            ) from err
        model = inference_copy(net)  # the fast path the run's own evaluation took: norms folded
        del net
        split = settings.test_split
        log.info(
            "evaluating %s (epoch %s) on %s/%s: %d images, %d process(es)",
            checkpoint, state.get("epoch"), cfg.data.name, split, len(test_set), info.world_size,
        )
        start = time.perf_counter()
        scores = evaluate(
            model, test_set, test_set.ground_truth(), classes, device, info,
            batch=settings.eval_batch, workers=settings.workers, metrics=list(settings.metrics), coco=settings.coco,
            detections_dir=Path(run_dir) / f"eval_{split}", split=split,
        )
        eval_time = time.perf_counter() - start
        if scores is None:
            return None
        record: dict[str, Any] = {
            "model": str(cfg.model.name),
            "norm": str(cfg.norm.name),
            "seed": int(cfg.seed),
            "checkpoint": str(checkpoint),
            "epoch": state.get("epoch"),
            "step": state.get("step"),
            "data": str(cfg.data.name),
            "dataset": str(test_set.root),
            "split": split,
            "images": len(test_set),
            "world_size": info.world_size,
            "overrides": list(overrides or []),
            **scores,
            "eval_time_s": eval_time,
            "device": str(device),
            "torch": torch.__version__,
        }
        if settings.fps_images > 0:
            record["fps"] = measure_fps(model, test_set, device, settings.fps_images, settings.fps_warmup)
        io.write_json(eval_file(run_dir, split), record)
        log.info(
            "%s on %s/%s: VOC07 mAP %.4f -> %s",
            cfg.model.name, cfg.data.name, split, record.get("map_voc07", math.nan), eval_file(run_dir, split),
        )
        return record
    finally:
        shutdown()


def _process_main(cfg: DictConfig, run_dir: Path, checkpoint: Path, overrides: list[str]) -> dict[str, Any] | None:
    """One of the ``processes=N`` workers (spawned: a fresh interpreter)."""
    rank = int(os.environ["RANK"])
    configure_process_logging(LOGGING, rank)
    if cfg.threads is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    try:
        return evaluate_run(cfg, run_dir, checkpoint, overrides)
    except USER_ERRORS as err:
        if rank == 0:  # the other processes met the same problem: one line is enough
            print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cbn_detect.evaluate",
        description="Evaluate a trained run's checkpoint again (VOC07/area mAP, AP per class, COCO AP, devkit "
        "files, FPS) on its test split or another split or dataset; writes <run_dir>/eval_<split>.json and "
        "leaves results.json alone.",
        epilog="overrides (Hydra syntax): data.test_split=val | data.root=DIR | data=voc07 | eval.fps_images=0 "
        "(no FPS) | eval.coco=false | eval.batch=N | device=cpu | processes=N (DDP shards; torchrun works too). "
        "Examples: python -m cbn_detect.evaluate outputs/2026-01-01/12-00-00/retinanet_tiny/bn/batch_8; "
        "python -m cbn_detect.evaluate RUN/checkpoints/last.pt data.test_split=val eval.fps_images=0; "
        "torchrun --standalone --nproc_per_node=2 -m cbn_detect.evaluate RUN",
    )
    parser.add_argument(
        "target", type=Path, help="a run folder (holding .hydra/ and checkpoints/) or a checkpoint file"
    )
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config (see below)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun or SLURM tasks: one process of several
    if not logging.getLogger().handlers:
        configure_process_logging(LOGGING, rank)
    try:
        run_dir, checkpoint = locate(args.target)
        cfg = load_config(run_dir, args.overrides)
        count = int(cfg.processes)
        if count < 1:
            raise ConfigError(f"processes={count} must be at least 1")
        if count > 1 and not started_by_a_launcher():
            try:
                run_processes(count, _process_main, cfg, run_dir, checkpoint, list(args.overrides))
            except ProcessesFailed as err:
                if set(err.exit_codes.values()) == {2}:
                    return 2  # rank 0 said why, in one line
                raise
        else:
            evaluate_run(cfg, run_dir, checkpoint, list(args.overrides))
    except USER_ERRORS as err:
        log.debug("evaluate failed", exc_info=True)
        if rank == 0:  # the other processes met the same problem: one line is enough
            print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
