"""A small synthetic detection dataset written in the real VOC layout, for CPU runs and tests.

It exists so that the whole pipeline (dataset, transforms, training, VOC evaluation) can run
end to end without a download, through exactly the code that reads real VOC. The task must be
learnable by a tiny detector in minutes yet need real features: classes are shapes (so colour
never gives the class away: every object gets a random hue and one of three fills), on textured
backgrounds that are kept lower in contrast than the objects.

Generation is deterministic: image i depends only on (seed, i) and the parameters, so two
generations with the same parameters are byte-identical. A dataset is generated once into a folder
named by a hash of its parameters and GENERATOR_VERSION (bump it whenever the output changes),
atomically: into a temporary sibling folder first, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cbn_detect.data.sources import DatasetSource
from cbn_detect.runtime.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
SYNTHETIC_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star")

MAX_OBJECTS = 6
MIN_SCALE, MAX_SCALE = 0.12, 0.6  # object extent as a fraction of the image side
MAX_IOU = 0.3  # between any two objects' boxes, so every object stays identifiable ...
MAX_COVER = 0.5  # ... and at most this much of the smaller box inside the other one
SMALL_SCALE = 0.13  # objects smaller than this (fraction of the side) are marked difficult
MIN_VISIBLE = 0.5  # objects with less of their area visible are marked difficult
PLACEMENT_TRIES = 20
JPEG_QUALITY = 95


def ensure_synthetic_voc(
    cache_dir: str | Path,
    *,
    num_train: int = 480,
    num_val: int = 64,
    num_test: int = 160,
    image_size: int = 128,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> Path:
    """The `VOCdevkit/VOC2007` folder of the dataset with these parameters, generated if needed.

    `classes` picks a subset of SYNTHETIC_CLASSES (None: all of them). Concurrent callers are
    safe: each generates into its own temporary folder and the first rename wins.
    """
    classes = tuple(SYNTHETIC_CLASSES if classes is None else classes)
    unknown = sorted(set(classes) - set(SYNTHETIC_CLASSES))
    if unknown or not classes:
        raise ConfigError(
            f"data.classes={list(classes)} must be a non-empty subset of the synthetic classes {SYNTHETIC_CLASSES}"
        )
    if min(num_train, num_val, num_test) < 1 or image_size < 32:
        raise ConfigError(
            "data.source.num_train, num_val and num_test must be >= 1 and data.source.image_size >= 32, got "
            f"{num_train}, {num_val}, {num_test} and {image_size}"
        )
    params = {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
        "classes": list(classes),
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"synthetic-{digest}"
    voc_dir = final / "VOCdevkit" / "VOC2007"
    if final.is_dir():
        return voc_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".synthetic-{digest}-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would keep the cache from other users of a shared disk
    try:
        _write_dataset(staging / "VOCdevkit" / "VOC2007", params, classes)
        (staging / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(staging, final)
            log.info("generated the synthetic dataset %s", voc_dir)
        except OSError:
            if not final.is_dir():
                raise
            log.info("another process generated %s first; using its copy", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return voc_dir


def synthetic_source(cache_dir: str | Path, **params: Any) -> DatasetSource:
    """The data config's ``source`` for the synthetic set: generated into ``cache_dir`` on first use
    (``params`` as :func:`ensure_synthetic_voc`), with the classes it was generated with."""
    root = ensure_synthetic_voc(cache_dir, **params)
    return DatasetSource(root, tuple(params.get("classes") or SYNTHETIC_CLASSES))


def _write_dataset(voc_dir: Path, params: dict, classes: tuple[str, ...]) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc_dir / sub).mkdir(parents=True)
    counts = {"train": params["num_train"], "val": params["num_val"], "test": params["num_test"]}
    splits: dict[str, list[str]] = {}
    index = 0
    for split, count in counts.items():
        splits[split] = [f"{i:06d}" for i in range(index + 1, index + count + 1)]
        index += count
    splits["trainval"] = splits["train"] + splits["val"]

    size = params["image_size"]
    for number, image_id in enumerate(splits["train"] + splits["val"] + splits["test"]):
        rng = np.random.default_rng([params["seed"], number])
        pixels, objects = _render_image(rng, size, classes)
        image_path = voc_dir / "JPEGImages" / f"{image_id}.jpg"
        Image.fromarray(pixels).save(image_path, quality=JPEG_QUALITY)
        (voc_dir / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, size, objects))
    for split, ids in splits.items():
        split_file = voc_dir / "ImageSets" / "Main" / f"{split}.txt"
        split_file.write_text("".join(f"{i}\n" for i in ids))


def _render_image(rng: np.random.Generator, size: int, classes: tuple[str, ...]) -> tuple[np.ndarray, list[dict]]:
    """One image (H, W, 3) uint8 and its objects: name, VOC box (1-based inclusive), difficult."""
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int64)  # which object each pixel shows
    placed: list[tuple[str, np.ndarray, np.ndarray]] = []  # (name, mask, xyxy box in pixels)
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _ in range(PLACEMENT_TRIES):
            name = classes[int(rng.integers(len(classes)))]
            mask = _shape_mask(rng, name, size)
            box = _tight_box(mask)
            if all(_separate(box, other) for _, _, other in placed):
                break
        else:
            continue
        x0, y0, x1, y1 = box
        region = canvas[y0:y1, x0:x1]
        region[...] = np.where(mask[y0:y1, x0:x1, None], _fill(rng, y1 - y0, x1 - x0), region)
        owner[mask] = len(placed)
        placed.append((name, mask, box))

    objects = []
    for k, (name, mask, box) in enumerate(placed):
        visible = np.count_nonzero(owner == k) / np.count_nonzero(mask)
        extent = max(box[2] - box[0], box[3] - box[1]) / size
        objects.append(
            {
                "name": name,
                "bbox": (box[0] + 1, box[1] + 1, box[2], box[3]),  # pixel indices -> 1-based
                "difficult": bool(visible < MIN_VISIBLE or extent < SMALL_SCALE),
            }
        )
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted texture: a gradient between two greyish colours, smooth noise and faint lines."""
    base = rng.uniform(70, 170, size=(2, 3))
    base = base.mean(axis=1, keepdims=True) + 0.35 * (base - base.mean(axis=1, keepdims=True))
    angle = rng.uniform(0, 2 * np.pi)
    steps = np.arange(size, dtype=np.float32)
    ramp = np.cos(angle) * steps[None, :] + np.sin(angle) * steps[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    canvas = base[0].astype(np.float32) + ramp[..., None] * (base[1] - base[0]).astype(np.float32)

    coarse = (12 * rng.standard_normal((6, 6, 3))).astype(np.float32)
    for c in range(3):
        smooth = Image.fromarray(coarse[..., c]).resize((size, size), Image.BILINEAR)
        canvas[..., c] += np.asarray(smooth)
    canvas += 4 * rng.standard_normal((size, size, 3), dtype=np.float32)

    lines = Image.new("L", (size, size))
    draw = ImageDraw.Draw(lines)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(15, 30)), width=int(rng.integers(1, 3)))
    sign = rng.choice([-1.0, 1.0])
    canvas += sign * np.asarray(lines, dtype=np.float32)[..., None]
    return canvas


def _shape_mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A boolean (size, size) mask of one shape, fully inside the image."""
    radius = rng.uniform(MIN_SCALE, MAX_SCALE) * size / 2
    cx, cy = rng.uniform(radius, size - radius, 2)
    aspect = rng.uniform(0.8, 1.25)
    rx, ry = radius * min(1.0, aspect), radius * min(1.0, 1 / aspect)
    image = Image.new("1", (size, size))
    draw = ImageDraw.Draw(image)
    ellipse = (cx - rx, cy - ry, cx + rx, cy + ry)
    if name == "circle":
        draw.ellipse(ellipse, fill=1)
    elif name == "ring":
        draw.ellipse(ellipse, fill=1)
        hole = rng.uniform(0.45, 0.6)
        draw.ellipse((cx - hole * rx, cy - hole * ry, cx + hole * rx, cy + hole * ry), fill=0)
    else:
        draw.polygon(_polygon(rng, name, cx, cy, rx, ry), fill=1)
    return np.asarray(image, dtype=bool)


def _polygon(
    rng: np.random.Generator, name: str, cx: float, cy: float, rx: float, ry: float
) -> list[tuple[float, float]]:
    """Vertices inside the ellipse (cx, cy, rx, ry); rotations kept small where they would make
    one class look like another (a square turned 45 degrees, a cross turned into an X)."""
    if name == "square":
        angles = np.deg2rad(45 + 90 * np.arange(4) + rng.uniform(-15, 15))
        radii = np.ones(4)
    elif name == "triangle":
        angles = np.deg2rad(-90 + 120 * np.arange(3) + rng.uniform(-30, 30))
        radii = np.ones(3)
    elif name == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10) + rng.uniform(-20, 20))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.48))
    elif name == "cross":
        # Per arm: its two outer corners at (1, +-arm) in the arm's frame, then the inner corner
        # at (arm, arm) on the diagonal; radii relative to the outer corners' distance.
        arm = rng.uniform(0.28, 0.38)
        outer = np.hypot(1.0, arm)
        spread = np.arctan2(arm, 1.0)
        arms = np.deg2rad(90 * np.arange(4) + rng.uniform(-15, 15))
        angles = np.stack([arms - spread, arms + spread, arms + np.pi / 4], axis=1).ravel()
        radii = np.tile([1.0, 1.0, np.hypot(arm, arm) / outer], 4)
    else:
        raise ValueError(f"unknown synthetic class {name!r}; known: {SYNTHETIC_CLASSES}")
    return list(zip(cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)))


def _fill(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) fill of one saturated random colour: solid, striped or noisy."""
    colour = _saturated_colour(rng)
    kind = int(rng.integers(3))
    if kind == 0:
        return np.broadcast_to(colour, (height, width, 3))
    if kind == 1:
        other = colour * rng.uniform(0.35, 0.6)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 9)
        phase = np.cos(angle) * np.arange(width)[None, :] + np.sin(angle) * np.arange(height)[:, None]
        stripes = np.sin(2 * np.pi * phase / period) > 0
        return np.where(stripes[..., None], colour, other)
    return colour + 28 * rng.standard_normal((height, width, 3), dtype=np.float32)


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    """A random hue at high saturation and value: far from the muted backgrounds."""
    hue = rng.uniform(0, 6)
    value = rng.uniform(170, 255)
    low = value * rng.uniform(0.0, 0.25)
    x = low + (value - low) * (1 - abs(hue % 2 - 1))
    sector = int(hue)
    rgb = [
        (value, x, low),
        (x, value, low),
        (low, value, x),
        (low, x, value),
        (x, low, value),
        (value, low, x),
    ][sector]
    return np.array(rgb, dtype=np.float64)


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) with x0, y0 the first and x1, y1 one past the last pixel of the mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int64)


def _separate(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two boxes overlap little enough for both objects to stay recognisable."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter <= MAX_IOU * (area_a + area_b - inter) and inter <= MAX_COVER * min(area_a, area_b)


def _annotation_xml(image_id: str, size: int, objects: list[dict]) -> str:
    parts = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source><database>cbn_detect synthetic</database></source>",
        f"\t<size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = (int(v) for v in obj["bbox"])
        parts += [
            "\t<object>",
            f"\t\t<name>{obj['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{int(obj['difficult'])}</difficult>",
            f"\t\t<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"
