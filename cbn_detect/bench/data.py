"""``python -m cbn_detect.bench data``: how fast the training data pipeline feeds a GPU.

What is timed is exactly what training iterates: ``train_loader`` over the training
``VOCDataset`` with RetinaNet's augmentation (JPEG decode, flip, float conversion, collate), at
each requested worker count. The question it answers is whether 8 workers per GPU keep up with the
``train`` row's images/s (``--target``); the per-worker rate of the largest worker count measured
(the one with the most contention) is projected to ``--project-workers``.

Worker counts are measured one after another, never side by side (concurrent loaders would
compete for the same cores), in rounds whose order rotates; the table reports medians. Each
measurement first drains the batches the workers prefetched while starting, so the timed window
sees their steady rate and not a full queue.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from cbn_detect.bench.common import interleaved_medians, parse_with_tiny
from cbn_detect.data.build import train_loader
from cbn_detect.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_voc
from cbn_detect.data.transforms import train_transforms
from cbn_detect.data.voc import VOCDataset

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # DataLoader's default, which train_loader keeps
TINY = dict(workers=[0, 1], batch=4, batches=2, warmup=1, rounds=1, synthetic_images=16, synthetic_size=64)


def dataset(args: argparse.Namespace) -> tuple[Dataset, str]:
    """The training split and a description of it: real VOC if ``--voc-root`` is given, else a
    synthetic set of VOC-sized images generated once into the cache."""
    transforms = train_transforms(args.hflip)
    if args.voc_root is not None:
        data = VOCDataset(
            args.voc_root, args.split, year=args.year, keep_difficult=False, transforms=transforms, on_error="skip"
        )
        return data, f"VOC{args.year} {args.split} ({len(data)} images)"
    cache = Path(os.environ.get("CBN_DETECT_CACHE", "~/.cache/cbn_detect")).expanduser()
    root = ensure_synthetic_voc(
        cache, num_train=args.synthetic_images, num_val=1, num_test=1, image_size=args.synthetic_size
    )
    data = VOCDataset(root, "train", classes=SYNTHETIC_CLASSES, keep_difficult=False, transforms=transforms)
    return data, f"synthetic {args.synthetic_size}px ({len(data)} images)"


def endless(loader: DataLoader) -> Iterator[Any]:
    """Batches across epochs, so a measurement may be longer than the dataset."""
    while True:
        yield from loader


def images_per_s(data: Dataset, workers: int, args: argparse.Namespace) -> float:
    """The loader's steady rate at ``workers`` workers, over ``args.batches`` batches."""
    loader = train_loader(data, args.batch, workers, seed=0, world_size=1, rank=0)
    batches = endless(loader)
    for _ in range(args.warmup + PREFETCH_FACTOR * workers):
        next(batches)
    images = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        images += len(next(batches)[0])
    return images / (time.perf_counter() - start)


def benchmark(data: Dataset, args: argparse.Namespace) -> list[tuple[int, float, float, float]]:
    """(workers, median images/s, images/s per worker, ratio to the target) per worker count."""

    def measure(workers: int, round_: int) -> float:
        rate = images_per_s(data, workers, args)
        log.info("round %d, %d workers: %.1f images/s", round_ + 1, workers, rate)
        return rate

    rates = interleaved_medians(args.workers, 0, args.rounds, measure)
    return [(w, rate, rate / max(w, 1), rate / args.target) for w, rate in zip(args.workers, rates)]


def format_table(rows: list[tuple[int, float, float, float]], described: str, args: argparse.Namespace) -> str:
    header = (
        f"# data: train_loader over {described}, batch {args.batch}, RetinaNet augmentation "
        f"(hflip {args.hflip:g}), {os.cpu_count()} CPUs, median of {args.rounds} rounds of "
        f"{args.batches} batches"
    )
    lines = [header, f"{'workers':<10}{'images_per_s':>14}{'per_worker':>12}{'ratio_to_target':>17}"]
    lines += [f"{w:<10}{rate:>14.2f}{per:>12.2f}{ratio:>17.2f}" for w, rate, per, ratio in rows]
    workers, _, per_worker, _ = max(rows)
    projected = per_worker * args.project_workers
    verdict = "enough" if projected >= args.target else "NOT enough"
    lines.append(
        f"# the train row needs {args.target:g} images/s; {args.project_workers} workers at the "
        f"{per_worker:.1f} images/s each measured with {workers} would give {projected:.0f}: {verdict}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cbn_detect.bench data", description=__doc__)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="worker counts to measure")
    p.add_argument("--batch", type=int, default=16, help="images per batch, as the train row")
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches, beyond the prefetched ones")
    p.add_argument("--rounds", type=int, default=3, help="measurements per worker count")
    p.add_argument("--target", type=float, default=167.0, help="images/s to feed (the train row's)")
    p.add_argument("--project-workers", type=int, default=8, help="worker count the verdict is for")
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--voc-root", default=None, help="a VOCdevkit folder; default: synthetic data")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="trainval")
    p.add_argument("--synthetic-images", type=int, default=256)
    p.add_argument("--synthetic-size", type=int, default=500, help="side in px (VOC images are about 500x375)")
    return parse_with_tiny(p, argv, TINY)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    data, described = dataset(args)
    print(format_table(benchmark(data, args), described, args))
    return 0
