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

A checkpoint file outside any run folder (``last.pt`` copied elsewhere) is evaluated on its own:
checkpoints carry the config their run composed (``config``, written by training since issue 21),
and the scores go beside it, named after it: ``<dir>/<name>.eval_<split>.json`` and
``<dir>/<name>.eval_<split>/`` for ``<dir>/<name>.pt`` (the name keeps several checkpoints of one
folder apart). When both exist, the run folder's ``.hydra/config.yaml`` is used, not the
checkpoint's copy: a run's own evaluation is what it always was. A checkpoint written before
checkpoints carried their config is evaluated only inside its run folder.

Weights that do not fit the config are reported with what differs, told from the state-dict keys
(``engine.checkpoint.compare_state_dicts``): another model (other layers: an SSD's in a RetinaNet
run), another norm (GroupNorm has no running statistics, CBN adds its history, FrozenBN counts no
batches, norm=none has no norm layers), or another number of classes (only the class-score layers
differ in size; the message names the count and the dataset to use), with a few of the keys.

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
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
from cbn_detect.engine.build import build_model
from cbn_detect.engine.checkpoint import NORM_KINDS, StateDictDiff, compare_state_dicts, read_checkpoint
from cbn_detect.evaluation.evaluator import evaluate
from cbn_detect.evaluation.fps import measure_fps
from cbn_detect.models.fold import inference_copy
from cbn_detect.overrides import config_keys, nearest_key
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
from cbn_detect.settings import RunSettings
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


def eval_file(run_dir: Path, split: str, prefix: str = "") -> Path:
    return Path(run_dir) / f"{prefix}eval_{split}.json"


@dataclass(frozen=True)
class Target:
    """What an evaluation scores, with which config, and where it writes."""

    out_dir: Path
    """The run folder; for a checkpoint outside any run folder, the checkpoint's own folder."""
    checkpoint: Path
    config: dict[str, Any] | None = None
    """The config the checkpoint carries, set only when no run folder holds the checkpoint."""

    @property
    def prefix(self) -> str:
        """Output names start with it: nothing in a run folder (``eval_<split>.json``), the
        checkpoint's name beside a lone checkpoint (``last.eval_<split>.json``), so that several
        checkpoints copied into one folder do not overwrite each other's scores."""
        return "" if self.config is None else f"{self.checkpoint.stem}."


def locate(target: Path) -> Target:
    """The run folder (or lone checkpoint) to evaluate. A checkpoint file is read here (mapped, not
    loaded), so that a corrupt one fails before any dataset is built or process started."""
    target = Path(target)
    if target.is_file():
        run_dir, checkpoint = target.absolute().parent.parent, target
        payload = read_checkpoint(checkpoint, mmap=True)
        if (run_dir / RUN_CONFIG).is_file():
            return Target(run_dir, checkpoint)  # the run folder's config, whatever the checkpoint carries
        if payload["config"] is not None:
            return Target(checkpoint.parent, checkpoint, dict(payload["config"]))
        raise ConfigError(
            f"{target}: not in a run of cbn_detect.train ({run_dir / RUN_CONFIG} not found) and, written before "
            "checkpoints carried their config, it holds none; evaluate it as RUN/checkpoints/last.pt inside the "
            "folder its run wrote"
        )
    if not target.is_dir():
        raise ConfigError(f"{target}: no such run folder or checkpoint")
    run_dir, checkpoint = target, target / CHECKPOINT
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(
            f"{target}: not a run of cbn_detect.train ({run_dir / RUN_CONFIG} not found); give the folder a "
            "run wrote (it holds .hydra/ and checkpoints/) or a checkpoint file"
        )
    if not checkpoint.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint to evaluate ({checkpoint} not found; did the run train an epoch?)")
    read_checkpoint(checkpoint, mmap=True)
    return Target(run_dir, checkpoint)


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
    ``data=<option>``); ``processes`` is 1 unless overridden. A key the config does not have is
    refused naming the nearest one, also as ``+key=value``: evaluation reads no key the run lacks."""
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
        if not exists:  # with + too: a key the run's config lacks is one nothing reads
            raise ConfigError(nearest_key(key, config_keys(cfg), shown=override.input_line))
        OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    OmegaConf.resolve(cfg)  # interpolations (the cache folder from $CBN_DETECT_CACHE, ...) resolve here
    return cfg


def checkpoint_config(config: Mapping[str, Any], overrides: list[str]) -> DictConfig:
    """:func:`load_config` applied to the config a checkpoint carries: written, for the moment of
    the call, where load_config reads a run's, so that overrides behave exactly as for a run folder."""
    with tempfile.TemporaryDirectory(prefix="cbn_detect_evaluate_") as folder:
        (Path(folder) / RUN_CONFIG).parent.mkdir()
        OmegaConf.save(OmegaConf.create(dict(config)), Path(folder) / RUN_CONFIG)
        return load_config(Path(folder), overrides)


def _labelled(config: Mapping[str, Any] | DictConfig | None) -> str | None:
    """ "<model> with <norm>" of a config (the checkpoint's own, say), None when it has not both."""
    try:
        return f"{config['model']['name']} with {config['norm']['name']}"  # type: ignore[index]
    except (KeyError, TypeError):
        return None


def _norm_kinds(kinds: set[str]) -> str:
    return " and ".join(f"{kind} ({NORM_KINDS[kind]})" for kind in sorted(kinds))


def _saved_classes(diff: StateDictDiff, num_classes: int) -> int | None:
    """The number of classes the checkpoint's class-score layers are sized for. Both detectors
    score ``num_classes + 1`` channels per anchor (models.retinanet, models.ssd), so the ratio of
    the output sizes gives it; None when the ratio is not a whole number."""
    for saved, ours in diff.logits_resized.values():
        outputs = saved[0] * (num_classes + 1)
        return outputs // ours[0] - 1 if outputs % ours[0] == 0 else None
    return None


def mismatch_message(
    checkpoint: Path, diff: StateDictDiff, cfg: DictConfig, num_classes: int, saved: Mapping[str, Any] | None
) -> str:
    """Why the checkpoint's weights do not fit the model ``cfg`` builds for ``num_classes``: which of
    model, norm and classes differ, a few keys as evidence, and what to do. ``saved``: the config the
    checkpoint carries, if any (it names the model, norm and data exactly)."""
    ours = f"{cfg.model.name} with {cfg.norm.name}"
    theirs = _labelled(saved)
    if diff.classes_differ and not diff.norm_differs:
        count = _saved_classes(diff, num_classes)
        trained = f"{count} classes" if count is not None else "another number of classes"
        if saved is not None and isinstance(saved.get("data"), Mapping):
            data = saved["data"]
            chosen = f" data.classes=[{','.join(map(str, data['classes']))}]" if data.get("classes") else ""
            where = f"it was trained on data={data.get('name')}{chosen}"
        else:
            where = "data=<option>, or data.classes=[...] naming them"
        those = f"those {count}" if count is not None else "the"
        return (
            f"checkpoint {checkpoint} was trained for {trained}, but data {cfg.data.name} as configured here has "
            f"{num_classes} (the class-score layers differ in size), e.g. {diff.evidence()}; evaluate it on a "
            f"dataset with {those} classes ({where})"
        )
    differs, details = [], []
    if diff.model_differs:
        differs.append("model")
        layers = (
            f"{len(diff.saved_layers)} of its layers are not in {cfg.model.name} and {len(diff.model_layers)} of "
            f"{cfg.model.name}'s not in it"
        )
        if diff.other_resized:
            layers += f", {len(diff.other_resized)} of other sizes"
        if diff.saved_family != diff.model_family and diff.saved_family and diff.model_family:
            details.append(f"it is {_a(diff.saved_family)}, {cfg.model.name} {_a(diff.model_family)} ({layers})")
        else:
            details.append(f"other layers than {cfg.model.name} ({layers})")
    if diff.norm_differs:
        differs.append("norm")
        saved_kinds, model_kinds = set(diff.saved_norms.values()), set(diff.model_norms.values())
        if saved_kinds != model_kinds:
            theirs_are = (
                f"its norm layers are {_norm_kinds(saved_kinds)}"
                if saved_kinds
                else "it has no norm layers (its convs have biases instead: norm none)"
            )
            ours_are = f"has {_norm_kinds(model_kinds)}" if model_kinds else "has no norm layers"
            details.append(f"{theirs_are} where {cfg.norm.name} {ours_are}")
        else:
            details.append(
                f"its norm layers sit elsewhere: {len(diff.saved_norms)} of them, where "
                f"norm.where={list(cfg.norm.where)} places {len(diff.model_norms)}"
            )
    if diff.classes_differ:  # with another norm as well (alone, it has its own message above)
        differs.append("classes")
        count = _saved_classes(diff, num_classes)
        details.append(
            f"its class-score layers are sized for {count or 'another number of'} classes, not {num_classes}"
        )
    if not differs:
        details.append(
            f"{len(diff.missing)} keys missing, {len(diff.unexpected)} unexpected, {len(diff.resized)} of other sizes"
        )
    if differs:
        what = f"another {', '.join(differs[:-1])}{' and ' if len(differs) > 1 else ''}{differs[-1]} than {ours}"
    else:
        what = f"weights that do not fit {ours}"
    if theirs is not None and theirs != ours:
        advice = f"its own config says {theirs}: evaluate a copy of it outside this run folder, which uses that config"
    else:
        advice = "evaluate it in the run folder it was trained in"
    return f"checkpoint {checkpoint} holds {what}: {'; '.join(details)}; e.g. {diff.evidence()}; {advice}"


def _a(family: str) -> str:
    return "an SSD" if family == "SSD" else f"a {family}"


def evaluate_run(
    cfg: DictConfig, run_dir: Path, checkpoint: Path, overrides: list[str] | None = None, prefix: str = ""
) -> dict[str, Any] | None:
    """Score the checkpoint on the configured test split; rank 0 writes ``<prefix>eval_<split>.json``
    in ``run_dir`` and returns its content (other ranks return None). ``overrides`` are recorded
    with the scores."""
    settings = RunSettings.from_config(cfg)
    info, device = init_distributed(resolve_device(settings.device))
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        classes = class_names(cfg.data)
        test_set = build_dataset(cfg.data, train=False)
        payload = read_checkpoint(checkpoint)
        state, saved_cfg = payload["state"], payload["config"]
        net = build_model(cfg, len(classes), device, total_steps=max(1, state["step"]))
        diff = compare_state_dicts(payload["model"], net.state_dict())
        if not diff.fits:  # say what differs rather than torch's list of every key
            raise CheckpointError(mismatch_message(checkpoint, diff, cfg, len(classes), saved_cfg))
        try:
            net.load_state_dict(payload["model"])
        except (RuntimeError, ValueError) as err:  # same keys and sizes, other content (CBN's window)
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit {cfg.model.name} with {cfg.norm.name} of the config "
                f"({type(err).__name__}: {first})"
            ) from err
        theirs, ours = _labelled(saved_cfg), f"{cfg.model.name} with {cfg.norm.name}"
        if theirs is not None and theirs != ours:  # bn, syncbn and brn (cbn, cbn_naive) share their keys
            log.warning(
                "%s was trained as %s (its own config); evaluating it as %s, the run's", checkpoint, theirs, ours
            )
        model = inference_copy(net)  # the fast path the run's own evaluation took: norms folded
        del net
        split = settings.test_split
        log.info(
            "evaluating %s (epoch %s) on %s/%s: %d images, %d process(es)",
            checkpoint,
            state["epoch"],
            cfg.data.name,
            split,
            len(test_set),
            info.world_size,
        )
        start = time.perf_counter()
        scores = evaluate(
            model,
            test_set,
            test_set.ground_truth(),
            classes,
            device,
            info,
            batch=settings.eval_batch,
            workers=settings.workers,
            metrics=list(settings.metrics),
            coco=settings.coco,
            detections_dir=Path(run_dir) / f"{prefix}eval_{split}",
            split=split,
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
        io.write_json(eval_file(run_dir, split, prefix), record)
        log.info(
            "%s on %s/%s: VOC07 mAP %.4f -> %s",
            cfg.model.name,
            cfg.data.name,
            split,
            record.get("map_voc07", math.nan),
            eval_file(run_dir, split, prefix),
        )
        return record
    finally:
        shutdown()


def _process_main(
    cfg: DictConfig, run_dir: Path, checkpoint: Path, overrides: list[str], prefix: str = ""
) -> dict[str, Any] | None:
    """One of the ``processes=N`` workers (spawned: a fresh interpreter)."""
    rank = int(os.environ["RANK"])
    configure_process_logging(LOGGING, rank)
    if cfg.threads is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    try:
        return evaluate_run(cfg, run_dir, checkpoint, overrides, prefix)
    except USER_ERRORS as err:
        if rank == 0:  # the other processes met the same problem: one line is enough
            print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cbn_detect.evaluate",
        description="Evaluate a trained run's checkpoint again (VOC07/area mAP, AP per class, COCO AP, devkit "
        "files, FPS) on its test split or another split or dataset; writes <run_dir>/eval_<split>.json and "
        "leaves results.json alone. A checkpoint file outside any run folder is evaluated with the config "
        "it carries and gets <name>.eval_<split>.json beside it.",
        epilog="overrides (Hydra syntax): data.test_split=val | data.root=DIR | data=voc07 | eval.fps_images=0 "
        "(no FPS) | eval.coco=false | eval.batch=N | device=cpu | processes=N (DDP shards; torchrun works too). "
        "Examples: python -m cbn_detect.evaluate outputs/2026-01-01/12-00-00/retinanet_tiny/bn/batch_8; "
        "python -m cbn_detect.evaluate RUN/checkpoints/last.pt data.test_split=val eval.fps_images=0; "
        "torchrun --standalone --nproc_per_node=2 -m cbn_detect.evaluate RUN",
    )
    parser.add_argument(
        "target", type=Path, help="a run folder (holding .hydra/ and checkpoints/) or a checkpoint file"
    )
    # default=[]: without a default argparse counts a nargs="*" positional as required and, given no
    # argument at all, says "the following arguments are required: target, overrides"
    parser.add_argument("overrides", nargs="*", default=[], help="key=value changes to the run's config (see below)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun or SLURM tasks: one process of several
    if not logging.getLogger().handlers:
        configure_process_logging(LOGGING, rank)
    try:
        target = locate(args.target)
        overrides = list(args.overrides)
        if target.config is None:
            cfg = load_config(target.out_dir, overrides)
        else:
            cfg = checkpoint_config(target.config, overrides)
            log.info("%s is outside any run folder: evaluating it with the config it carries", target.checkpoint)
        run_dir, checkpoint = target.out_dir, target.checkpoint
        count = int(cfg.processes)
        if count < 1:
            raise ConfigError(f"processes={count} must be at least 1")
        if count > 1 and not started_by_a_launcher():
            try:
                run_processes(count, _process_main, cfg, run_dir, checkpoint, overrides, target.prefix)
            except ProcessesFailed as err:
                if set(err.exit_codes.values()) == {2}:
                    return 2  # rank 0 said why, in one line
                raise
        else:
            evaluate_run(cfg, run_dir, checkpoint, overrides, target.prefix)
    except USER_ERRORS as err:
        log.debug("evaluate failed", exc_info=True)
        if rank == 0:  # the other processes met the same problem: one line is enough
            print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
