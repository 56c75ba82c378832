"""The one definition of ``results.json``: a run's final numbers, which the report, the W&B summary
and the tests read. ``results_batch_<B>.txt`` repeats them for people.

Every job directory of a sweep ends with one, whatever happened: ``completed`` runs carry their
scores; ``failed``, ``diverged`` and ``interrupted`` runs their ``error``; ``skipped`` runs (a norm
that cannot train at this batch on this model) their ``reason``. Fields that do not apply to a run
are left out of the file rather than written as null; a number that is not finite (a loss variance
of fewer than two losses, the mAP of a diverged run) is written as null, as in ``metrics.jsonl``, so
the file is strict JSON. A file that cannot be read (cut short, edited by hand) is an
:class:`UnreadableResults` naming it, never a bare JSON error.

The file records its layout's version (``schema_version``); :func:`read_results` converts an older
layout in one place (:func:`current_layout`) and refuses a newer one (:class:`NewerResults`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbn_detect.runtime import io
from cbn_detect.runtime.errors import ReportedError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1
"""The layout :func:`write_results` writes. A field added or left out needs no new version
(readers take a missing field as None, an unknown one into ``extra``); a field renamed, or one
whose meaning changes, takes the next number and a conversion in :func:`current_layout`."""
UNVERSIONED = 0
"""The version of a file without ``schema_version``: written before the layout had a version. Its
fields are those of version 1 (numbers that are not finite were written as NaN, which still reads)."""

STATUSES = ("completed", "failed", "diverged", "interrupted", "skipped")


class UnreadableResults(ReportedError):
    """A ``results.json`` that is not a JSON object (cut short by a full disk or a copy, edited by
    hand); the message names the file. Its job counts as not completed."""


class NewerResults(UnreadableResults):
    """A ``results.json`` of a layout newer than this code knows; the message names the file and
    both versions. Unreadable like any other: read as a known layout, its numbers could be misread."""


@dataclass
class Results:
    """``results.json``, field by field, in file order."""

    status: str
    model: str
    norm: str
    batch: int
    """Images per process."""
    world_size: int
    total_batch: int
    """``batch`` x ``world_size``: the images of one optimizer step."""
    seed: int
    data: str
    schema_version: int = SCHEMA_VERSION
    error: str | None = None
    """Why a run failed, diverged or was interrupted."""
    reason: str | None = None
    """Why a run was skipped."""
    dataset_dir: str | None = None
    """The ``VOC<year>`` folder the final evaluation scored (absolute), so that
    ``python -m cbn_detect.voc_eval --run <run_dir>`` can rescore the run's ``detections/`` against it:
    the synthetic set lives in a hashed cache folder that nothing else records."""
    test_split: str | None = None
    """The split of ``dataset_dir`` that was scored (``data.test_split``): the ``<split>`` of the
    ``comp4_det_<split>_<class>.txt`` files in ``detections/``."""
    map_voc07: float | None = None
    """VOC07 11-point mAP, the headline number."""
    map_area: float | None = None
    """VOC2010+ area mAP."""
    ap_per_class: dict[str, float | None] | None = None
    """AP per class under ``ap_metric`` (None: a class without positives)."""
    ap_metric: str | None = None
    coco: dict[str, float] | None = None
    """COCO-style AP, AP50, AP75, APs, APm, APl."""
    fps: dict[str, Any] | None = None
    """Batch-1 throughput: fps_model, fps_end_to_end, device, dtype, size, images."""
    loss_variance: float | None = None
    """Population variance of the last completed epoch's per-iteration losses (NaN, null in the
    file: fewer than 2 values)."""
    loss_variance_window: float | None = None
    """The same over the last ``train.loss_window`` iterations."""
    final_loss: float | None = None
    train_time_s: float | None = None
    epochs: int | None = None
    steps: int | None = None
    nonfinite_steps: int | None = None
    eval_time_s: float | None = None
    num_detections: int | None = None
    data_problems: dict[str, Any] | None = None
    device: str | None = None
    amp: str | None = None
    torch: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of a file this version does not know (a newer writer's): kept, never dropped."""

    def to_dict(self) -> dict[str, Any]:
        """The file's content: fields that do not apply (None) left out, then every non-finite
        number as None (null), by the one rule of :func:`cbn_detect.runtime.io.jsonable`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return io.jsonable({k: v for k, v in out.items() if v is not None} | self.extra)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Results:
        """Tolerant of files this version did not write: a missing identity field reads as None,
        an unknown key lands in ``extra``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name != "extra"]
        values = dict.fromkeys(required) | {k: v for k, v in raw.items() if k in known}
        values.setdefault("schema_version", UNVERSIONED)
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Results) if f.name != "extra")


def current_layout(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The content of ``path`` in the layout of :data:`SCHEMA_VERSION`. Versions 0 and 1 have the
    same fields, so nothing is converted yet: the next version's conversion goes here, keyed by the
    version the file records. A version this code does not know (a newer one) is a
    :class:`NewerResults`."""
    version = raw.get("schema_version", UNVERSIONED)
    if not isinstance(version, int) or not UNVERSIONED <= version <= SCHEMA_VERSION:
        raise NewerResults(
            f"{path} has schema_version {version!r}, which this cbn_detect does not know (it reads versions "
            f"{UNVERSIONED} to {SCHEMA_VERSION}): read it with the cbn_detect that wrote it"
        )
    return raw


def read_results(run_dir: Path) -> Results | None:
    """The run's results, or None when it wrote none yet; :class:`UnreadableResults` when the file
    is there but is not a JSON object, or is of a newer layout (:class:`NewerResults`)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"it holds a JSON {type(raw).__name__}, not an object")
        return Results.from_dict(current_layout(raw, path))
    except (OSError, ValueError, TypeError) as err:
        raise UnreadableResults(f"{path} cannot be read ({type(err).__name__}: {err})") from err


def completed_results(run_dir: Path, *, warn: bool = True) -> Results | None:
    """The results of a completed run in ``run_dir``, else None: no file yet, another status, or a
    file that cannot be read, which counts as not completed (so the job runs or resumes and writes
    a new one) with a warning naming it unless ``warn`` is false."""
    try:
        found = read_results(run_dir)
    except UnreadableResults as err:
        if warn:
            log.warning("%s; counting the job as not completed", err)
        return None
    return found if found is not None and found.status == "completed" else None


def results_text(results: Results) -> str:
    """The original study's ``results_batch_<B>.txt``, with the settings that produced the numbers."""

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"model: {results.model}",
        f"norm: {results.norm}",
        f"batch per process: {results.batch}  world size: {results.world_size}  total batch: {results.total_batch}",
        f"seed: {results.seed}",
        f"status: {results.status}",
    ]
    if results.dataset_dir is not None:
        lines.append(f"dataset: {results.dataset_dir} (split {results.test_split})")
    for key in ("error", "reason"):
        if getattr(results, key):
            lines.append(f"{key}: {getattr(results, key)}")
    for key in ("map_voc07", "map_area", "loss_variance", "final_loss", "train_time_s", "epochs", "steps"):
        if getattr(results, key) is not None:
            lines.append(f"{key}: {fmt(getattr(results, key))}")
    if results.coco is not None:
        lines.append("coco: " + "  ".join(f"{k} {fmt(v)}" for k, v in results.coco.items()))
    if results.fps is not None:
        fps = results.fps
        lines.append(
            f"fps (batch 1, {fps['device']}, {fps['dtype']}): model {fps['fps_model']:.1f}  "
            f"end-to-end {fps['fps_end_to_end']:.1f}"
            + ("  (disturbed: end-to-end above model-only; time it again)" if fps.get("consistent") is False else "")
        )
    if results.ap_per_class is not None:
        lines.append(f"AP per class ({results.ap_metric or 'voc07'}):")
        for name, ap in results.ap_per_class.items():
            lines.append(f"  {name:<14} {'no positives' if ap is None else f'{ap:.4f}'}")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: Results) -> None:
    io.write_json(Path(run_dir) / RESULTS_FILE, results.to_dict())
    io.write_text(Path(run_dir) / f"results_batch_{results.batch}.txt", results_text(results))
