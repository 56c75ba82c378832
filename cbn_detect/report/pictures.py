"""What the numbers mean: per model and batch, ``detections_<model>_b<batch>.png`` shows the same
few test images with their ground truth, then one row per norm with the detections of its seed-0
job (else its first completed one), read from the job's devkit files (``detections/``); no model is
loaded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure

from cbn_detect.evaluation.pictures import (
    DEFAULT_IMAGES,
    DEFAULT_SCORE,
    Drawing,
    Example,
    SplitData,
    draw_detections,
    draw_ground_truth,
    job_test_split,
    load_examples,
    pick_images,
)
from cbn_detect.report.collect import JobResult, cells, completed, norm_order
from cbn_detect.report.figures import save_png

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PictureFile:
    """One grid of ``detections_<model>_b<batch>.png``: its file, title and the jobs it shows."""

    name: str
    model: str
    batch: int
    jobs: dict[str, str]  # norm -> job directory (relative to the sweep)


@dataclass(frozen=True)
class GridRow:
    """One row of a picture: its title, a drawing per image, and the detections drawn in each
    (None: the ground-truth row)."""

    title: str
    pictures: list[Drawing]
    detections: list[int] | None = None


def _picture_job(members: Sequence[JobResult]) -> JobResult | None:
    """The job a cell's picture shows: the completed seed 0, else the first completed by seed."""
    done = sorted(completed(members), key=lambda m: (m.seed != 0, m.seed or 0, m.job_dir))
    return done[0] if done else None


def _font() -> str | None:
    """A TrueType font for the box labels (matplotlib's own DejaVu Sans; PIL's bitmap font without it)."""
    try:
        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except ValueError:
        return None


def write_detection_pictures(
    rows: Sequence[JobResult], sweep_dir: Path, images: int = DEFAULT_IMAGES, score: float = DEFAULT_SCORE
) -> list[PictureFile]:
    """One ``detections_<model>_b<batch>.png`` per (model, batch) with a completed job that kept its
    detections (``detections/``); test splits are built once per distinct data config."""
    if images < 1:
        return []
    grid = cells(rows)
    splits: dict[str, SplitData] = {}
    written = []
    for model, batch in sorted({(m, b) for m, _, b in grid}):
        jobs = {}
        for (m, norm, b), members in grid.items():
            job = _picture_job(members) if (m, b) == (model, batch) else None
            if job is not None and (sweep_dir / job.job_dir / "detections").is_dir():
                jobs[norm] = job
        if not jobs:
            continue
        name = f"detections_{model}_b{batch}.png"
        drawn = plot_detections(sweep_dir, model, batch, jobs, sweep_dir / name, images, score, splits)
        if drawn:
            written.append(PictureFile(name, model, batch, drawn))
    return written


def plot_detections(
    sweep_dir: Path,
    model: str,
    batch: int,
    jobs: dict[str, JobResult],
    path: Path,
    images: int = DEFAULT_IMAGES,
    score: float = DEFAULT_SCORE,
    splits: dict[str, SplitData] | None = None,
) -> dict[str, str]:
    """The grid for (model, batch): a column per test image, the ground truth on top, then a row per
    norm with its job's detections scoring at least ``score``. Returns the jobs drawn (norm -> job
    dir); a job whose test split or detections cannot be read is left out with a warning, and
    nothing is drawn when none can."""
    splits = {} if splits is None else splits
    font = _font()
    rows: list[GridRow] = []
    drawn: dict[str, str] = {}
    ids: list[str] = []
    for norm in norm_order(list(jobs)):
        job = jobs[norm]
        try:
            split = job_test_split(sweep_dir / job.job_dir, splits)
            ids = ids or [split.gt.image_ids[i] for i in pick_images(split.gt, images)]
            examples = _examples(split, sweep_dir / job.job_dir, ids, score)
        except Exception as err:  # noqa: BLE001 - a picture that cannot be drawn must not cost the report
            log.warning("%s: no detection picture (%s: %s)", job.job_dir, type(err).__name__, err)
            continue
        if not rows:
            rows.append(GridRow("ground truth", [draw_ground_truth(e, split.classes, font=font) for e in examples]))
        metric = "" if job.map_voc07 is None else f"\nVOC07 mAP {job.map_voc07:.3f}"
        pictures = [draw_detections(e, split.classes, font=font) for e in examples]  # labels never overlap
        rows.append(GridRow(f"{norm}\nseed {job.seed}{metric}", pictures, [len(e.scores) for e in examples]))
        drawn[norm] = job.job_dir
    if drawn:
        title = (
            f"{model}, {batch} images per process: ground truth (top), then each norm's detections "
            f"with score ≥ {score:g}"
        )
        save_png(_grid_figure(rows, ids, score, title), path)
    return drawn


def _examples(split: SplitData, job_dir: Path, ids: Sequence[str], score: float) -> list[Example]:
    """The job's detections on the test images ``ids``, which its split must hold."""
    where = {image_id: i for i, image_id in enumerate(split.gt.image_ids)}
    missing = [image_id for image_id in ids if image_id not in where]
    if missing:
        raise ValueError(f"its test split lacks image {missing[0]}")
    return load_examples(
        split.dataset,
        split.gt,
        job_dir / "detections",
        split.split,
        split.classes,
        [where[image_id] for image_id in ids],
        score,
    )


def _grid_figure(rows: Sequence[GridRow], ids: Sequence[str], score: float, title: str) -> Figure:
    """A row of pictures per :class:`GridRow`, a column per image; a picture says so when it shows
    no detection or had to leave labels out."""
    figure = Figure(figsize=(2.7 * len(ids), 2.7 * len(rows) + 0.5))
    axes = np.atleast_2d(figure.subplots(len(rows), len(ids), squeeze=False))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row.pictures):
            ax = axes[r, c]
            ax.imshow(picture.image.permute(1, 2, 0).numpy())
            note = f"no detection ≥ {score:g}" if row.detections is not None and row.detections[c] == 0 else None
            if picture.unlabelled:  # crowded: labels were placed best score first, these found no room
                note = f"{picture.unlabelled} of {len(picture.labels)} labels left out (no room)"
            if note is not None:
                ax.text(
                    0.5,
                    0.03,
                    note,
                    transform=ax.transAxes,
                    ha="center",
                    va="bottom",
                    fontsize="small",
                    color="white",
                    bbox={"facecolor": "black", "alpha": 0.6, "linewidth": 0},
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(ids[c], fontsize="small")
            if c == 0:
                ax.set_ylabel(row.title, fontsize="small")
    figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    return figure


def pictures_markdown(pictures: Sequence[PictureFile], images: int, score: float) -> list[str]:
    """The detection pictures' section of report.md (nothing without a picture)."""
    if not pictures:
        return []
    text = [
        "## Detections",
        "",
        (
            f"The same {images} test images in every picture (the split's first with an object that is not "
            "difficult): the ground truth on top (difficult objects marked), then one row per norm with the "
            f"detections scoring at least {score:g}, read from the devkit files (`detections/`) of the norm's "
            "seed-0 job (else its first completed one). A box's colour is its class."
        ),
        "",
    ]
    for picture in pictures:
        jobs = ", ".join(f"{norm}: `{job}`" for norm, job in picture.jobs.items())
        text += [
            f"### {picture.model}, {picture.batch} images per process",
            "",
            f"![{picture.model} detections at batch {picture.batch}]({picture.name})",
            "",
            f"Jobs: {jobs}.",
            "",
        ]
    return text
