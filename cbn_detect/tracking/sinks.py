"""Metric sinks: ``metrics.jsonl`` on disk and the log; W&B plugs in behind the same interface."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from cbn_detect.runtime.io import jsonable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionPicture:
    """An image with its ground truth and detections, as W&B's box overlay shows them: ``image`` is
    uint8 (H, W, 3); boxes are float xyxy in the image's pixels, labels 1..C (the class names'
    order), ``gt_difficult`` flags the difficult objects."""

    image: np.ndarray
    caption: str
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


class MetricSink:
    """Where a run's numbers go. Every sink takes records (``log``); histograms, pictures and the
    final summary are for the sinks that show them (W&B), and the others inherit methods that
    ignore them, so the run calls every method on every sink.

    ``draws``: whether the sink shows histograms and pictures. Making them costs a copy of every
    weight or a read of test images, so the run makes them only when some sink draws them.
    """

    draws: ClassVar[bool] = False

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One record of ``step``: a step's losses and speed, diagnostics, evaluation results."""
        raise NotImplementedError

    def log_histograms(self, tensors: Mapping[str, Tensor], step: int) -> None:
        """Weight and gradient distributions (diagnostics level ``full``)."""

    def log_detections(
        self, key: str, pictures: Sequence[DetectionPicture], class_names: Sequence[str], step: int
    ) -> None:
        """A few test images with their ground truth and detections, at ``step``."""

    def summary(self, results: Mapping[str, Any]) -> None:
        """The run's final numbers (``results.json``'s), once, before :meth:`close`."""

    def close(self) -> None:
        """Write out what is pending; the sink takes nothing after this."""


class JsonlSink(MetricSink):
    """One JSON object per logged step, appended and flushed at once so a killed run keeps its history.

    On resume the file is cut back to the checkpoint's step first, so no step appears twice.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._handle = self.path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = jsonable({"step": step, **metrics})  # non-finite floats as null, as in results.json
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class LoggingSink(MetricSink):
    """A compact line in the console and ``train.log`` for each logged step.

    By default only the headline numbers (loss and its terms, lr, gradient norm, throughput,
    evaluation results) are shown; the per-group and per-layer diagnostics go to ``metrics.jsonl``
    and W&B only, where they can be plotted (``full=True``, i.e. ``diagnostics.console=true``,
    prints them too)."""

    HEADLINE = ("epoch", "loss", "loss_variance_window", "lr", "grad_norm", "images_per_s", "nonfinite_total")
    HEADLINE_GROUPS = ("loss/", "eval/")

    def __init__(self, full: bool = False) -> None:
        self.full = full

    def log(self, metrics: dict[str, Any], step: int) -> None:
        shown = (
            metrics
            if self.full
            else {k: v for k, v in metrics.items() if k in self.HEADLINE or k.startswith(self.HEADLINE_GROUPS)}
        )
        if not shown:
            return
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
        log.info("step %d  %s", step, "  ".join(parts))
