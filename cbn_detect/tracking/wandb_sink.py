"""Weights & Biases behind the ``MetricSink`` interface, built so that W&B can never stop training.

W&B is a convenience on top of the files every run writes anyway (``metrics.jsonl``,
``results.json``), so every W&B failure ends in one warning and a fallback, never in an exception or
a hang:

- ``online`` that cannot start (no API key, unreachable or unresponsive server, login prompt timed
  out) falls back to ``offline``: nothing is lost, and ``wandb sync <run_dir>/wandb/offline-run-*``
  uploads the run later. Once online has failed in a process, later runs of the same process (the
  jobs of a local multirun) go offline at once instead of waiting for the timeout again.
- ``offline`` that cannot start (unwritable directory, broken install) falls back to no W&B.
- A call that fails during training (the W&B service died) disables the sink with one warning.

One job is one W&B run, also across a requeue or a rerun into the same directory: the run id is kept
in ``<run_dir>/wandb/run_id`` and passed to ``wandb.init(id=..., resume="allow")`` when the job
resumes from its checkpoint, so online the resumed part continues the same run. Offline, W&B 0.31
ignores ``resume`` (``run.resumed`` is False) and writes each process's part into a folder of its
own, ``offline-run-<time>-<id>`` (``-<id>-1`` within the same second), every part under the same
id, which ``wandb sync`` uploads to (not checked here: that needs a server);
``wandb_reader.wait_for_run`` reads the parts back as one run. A job that starts over (no
checkpoint, ``train.resume=never``) gets a new id: its steps would collide with the first attempt's.

W&B never prompts: without an API key, ``wandb.init`` on a terminal asks for one and waits forever
(e.g. inside ``srun --pty``), so online mode first looks for credentials with ``prompt=False``.
``init_timeout`` bounds the server handshake and ``finish_timeout`` the final upload.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import secrets
import signal
import string
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import wandb

from cbn_detect.runtime import io
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.tracking.sinks import DetectionPicture, MetricSink

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")

RUN_ID_FILE = Path("wandb") / "run_id"
"""Where a run directory keeps its W&B run id (relative to the run directory)."""

_online_failed = False
"""Set when online init failed in this process, so the next job does not wait for it again."""


SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""The signals a scheduler sends before it ends a job (those the training loop checkpoints on)."""


def box_data(
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
    difficult: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """W&B's ``box_data``: each box's pixel position, class id (our label), caption and score."""
    entries = []
    rows = np.asarray(boxes, np.float64).reshape(-1, 4).tolist()
    for i, (box, label) in enumerate(zip(rows, np.asarray(labels).tolist())):
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        entry: dict[str, Any] = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "domain": "pixel",
            "class_id": int(label),
        }
        if scores is not None:
            entry["scores"] = {"score": float(scores[i])}
            entry["box_caption"] = f"{name} {float(scores[i]):.2f}"
        else:
            entry["box_caption"] = name + (" (difficult)" if difficult is not None and bool(difficult[i]) else "")
        entries.append(entry)
    return entries


def wandb_image(picture: DetectionPicture, class_names: Sequence[str]) -> wandb.Image:
    """The picture with two box layers, ``predictions`` and ``ground_truth``, toggled in W&B's viewer."""
    class_labels = {i: name for i, name in enumerate(class_names, start=1)}
    boxes = {
        "predictions": {
            "box_data": box_data(picture.boxes, picture.labels, class_names, scores=picture.scores),
            "class_labels": class_labels,
        },
        "ground_truth": {
            "box_data": box_data(picture.gt_boxes, picture.gt_labels, class_names, difficult=picture.gt_difficult),
            "class_labels": class_labels,
        },
    }
    return wandb.Image(picture.image, boxes=boxes, caption=picture.caption)


class WandbSink(MetricSink):
    """One W&B run: per-step metrics at our global step, the final numbers in the run summary.

    A job that SLURM requeues (submitit's handler of SIGUSR2 calls ``scontrol requeue``) is killed
    with all its processes at once, W&B's service among them, which writes its log only every 15 s
    and holds the last step's row until the next step: the part before the requeue would be lost.
    So where such a handler is installed (a callable, not the default action) for ``SIGNALS``, the
    sink finishes its run first, then calls it (the training loop calls it after its checkpoint).
    """

    draws = True

    def __init__(self, run: Any) -> None:
        self.run = run
        self._broken = False
        self._closed = False
        self._no_images = False
        self._handed_on: dict[int, tuple[Any, Any]] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if callable(previous):
                    handler = functools.partial(self._finish_then, previous)
                    signal.signal(signum, handler)
                    self._handed_on[signum] = (previous, handler)

    def _finish_then(self, previous: Callable[[int, Any], Any], signum: int, frame: Any) -> None:
        if not self._closed:
            log.info("W&B: finishing run %s before %s is handled", self.run.id, signal.Signals(signum).name)
            self.close(128 + signum)
        previous(signum, frame)

    @property
    def mode(self) -> str:
        return "offline" if self.run.offline else "online"

    def _guard(self, action: Callable[[], None], what: str) -> None:
        """Run a W&B call; the first failure disables the sink, because training matters more."""
        if self._broken or self._closed:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - any W&B failure must leave training running
            self._broken = True
            log.warning(
                "W&B %s failed (%s: %s); W&B logging is off for the rest of this run. "
                "metrics.jsonl and results.json still hold everything.",
                what,
                type(err).__name__,
                err,
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard(lambda: self.run.log(dict(metrics), step=step), "log")

    def log_histograms(self, tensors: Mapping[str, Any], step: int) -> None:
        """Weight and gradient distributions (diagnostics level ``full``) as W&B histogram panels."""
        self._guard(
            lambda: self.run.log({k: wandb.Histogram(v.numpy(), num_bins=64) for k, v in tensors.items()}, step=step),
            "histogram log",
        )

    def log_detections(
        self, key: str, pictures: Sequence[DetectionPicture], class_names: Sequence[str], step: int
    ) -> None:
        """A few test images with their ground truth and detections (box layers), at ``step``."""
        if self._broken or self._closed or self._no_images:
            return
        try:
            images = [wandb_image(p, class_names) for p in pictures]
        except Exception as err:  # noqa: BLE001 - a picture is not worth the run's other W&B logging
            self._no_images = True
            log.warning("W&B images could not be made (%s: %s); this run logs no more images", type(err).__name__, err)
            return
        self._guard(lambda: self.run.log({key: images}, step=step), "image log")

    def summary(self, results: Mapping[str, Any]) -> None:
        """Make the run's summary the final numbers (not the last logged step's), flattened for W&B's table."""
        self._guard(lambda: self.run.summary.update(flatten(results)), "summary")

    def close(self, exit_code: int | None = None) -> None:
        """Finish the run (also after a failed call: what was logged gets written); later calls do nothing.

        Without ``exit_code``, the run's is that of the exception propagating through the caller, if
        any (``run()`` closes its sinks in a ``finally``): 128 + signum for an interrupt (an exception
        with a ``signum``, as ``TrainingInterrupted``), 1 for any other, 0 without one. W&B shows a
        run with a non-zero exit code as crashed until a resumed part finishes it.
        """
        if exit_code is None:
            exit_code = _exit_code(sys.exc_info()[1])
        self._broken = False
        self._guard(lambda: self.run.finish(exit_code=exit_code), "finish")
        self._closed = True
        if threading.current_thread() is threading.main_thread():
            for signum, (previous, handler) in self._handed_on.items():
                if signal.getsignal(signum) is handler:
                    signal.signal(signum, previous)
        self._handed_on.clear()


def _exit_code(err: BaseException | None) -> int:
    if err is None:
        return 0
    if isinstance(getattr(err, "signum", None), int):
        return 128 + err.signum
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else 1
    return 1


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"coco": {"AP50": x}}`` -> ``{"coco/AP50": x}``: W&B's run table shows flat keys as columns.

    Non-finite floats become None: W&B stores NaN, but a diverged run's summary should read as
    missing, exactly as in ``results.json``.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, float) and not math.isfinite(value):
            flat[name] = None
        else:
            flat[name] = value
    return flat


def _settings(wandb_cfg: Mapping[str, Any]) -> wandb.Settings:
    timeout = float(wandb_cfg.get("init_timeout", 30))
    return wandb.Settings(init_timeout=timeout, finish_timeout=max(timeout, 60.0), quiet=True)


def run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of the job in ``run_dir``: the kept one when the job resumes, else a new one
    (8 characters of [a-z0-9], as W&B's own), kept for the next resume."""
    path = Path(run_dir) / RUN_ID_FILE
    if resume and path.exists():
        kept = path.read_text(encoding="utf-8").strip()
        if kept:
            return kept
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    io.write_text(path, new + "\n")
    return new


def _init(
    mode: str,
    wandb_cfg: Mapping[str, Any],
    run_config: dict,
    name: str,
    group: str | None,
    run_dir: Path,
    wandb_id: str,
) -> Any:
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        raise wandb.errors.UsageError("no API key found (WANDB_API_KEY, ~/.netrc)")
    run = wandb.init(
        mode=mode,
        id=wandb_id,
        resume="allow",
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        group=group,
        tags=list(wandb_cfg.get("tags") or []),
        name=name,
        config=run_config,
        dir=str(run_dir),
        reinit="finish_previous",
        settings=_settings(wandb_cfg),
    )
    log.info("W&B %s run %s (%s) in %s", mode, run.id, name, run.dir)
    return run


def build_wandb_sink(
    wandb_cfg: Mapping[str, Any], run_config: dict, name: str, group: str | None, run_dir: Path, resume: bool = False
) -> WandbSink | None:
    """A sink for the run in ``run_dir`` (W&B files go to ``run_dir/wandb``), or None for no W&B.

    ``wandb_cfg`` is the config's ``wandb`` node; its ``group`` wins over ``group`` (the sweep).
    ``resume``: the job continues from a checkpoint, so it continues the W&B run kept in ``run_dir``.
    """
    global _online_failed
    mode = str(wandb_cfg.get("mode", "offline"))
    if mode not in MODES:
        raise ConfigError(f"wandb.mode={mode} is not one of {', '.join(MODES)}")
    if mode == "disabled":
        return None
    group = wandb_cfg.get("group") or group
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        identity = run_id(run_dir, resume)
    except OSError as err:
        log.warning("cannot keep the W&B run id in %s (%s); this run goes on without W&B", run_dir / RUN_ID_FILE, err)
        return None
    if mode == "online" and _online_failed:
        log.info("W&B online failed earlier in this process; logging %s offline", name)
        mode = "offline"
    if mode == "online":
        try:
            return WandbSink(_init("online", wandb_cfg, run_config, name, group, run_dir, identity))
        except Exception as err:  # noqa: BLE001 - see the module docstring
            _online_failed = True
            with contextlib.suppress(Exception):
                # W&B's service keeps the failed run's id "in use" in this process, which would make
                # the offline run of the same id fail too; a fresh service forgets it.
                wandb.teardown()
            log.warning(
                "W&B online could not start (%s: %s). Logging offline instead; upload later with "
                "`wandb sync %s/wandb/offline-run-*`. To log online, set WANDB_API_KEY (or run "
                "`wandb login`) and check that the server (WANDB_BASE_URL, default api.wandb.ai) is "
                "reachable within wandb.init_timeout=%s s; wandb.mode=offline skips this attempt.",
                type(err).__name__,
                err,
                run_dir,
                wandb_cfg.get("init_timeout"),
            )
            mode = "offline"
    try:
        return WandbSink(_init(mode, wandb_cfg, run_config, name, group, run_dir, identity))
    except Exception as err:  # noqa: BLE001 - see the module docstring
        log.warning(
            "W&B offline could not start (%s: %s); this run goes on without W&B "
            "(metrics.jsonl and results.json hold everything). wandb.mode=disabled silences this.",
            type(err).__name__,
            err,
        )
        return None
