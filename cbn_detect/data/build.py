"""Datasets and loaders from the ``data`` config group."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from cbn_detect.data.sources import DatasetSource
from cbn_detect.data.transforms import test_transforms
from cbn_detect.data.voc import Transforms, VOCDataset

log = logging.getLogger(__name__)


def dataset_source(data_cfg: DictConfig) -> DatasetSource:
    """The dataset's folder and classes, from the config's ``source`` (``_target_`` decides how the
    folder is obtained: an existing devkit, or the synthetic set generated into a cache)."""
    return instantiate(data_cfg.source)


def class_names(data_cfg: DictConfig, source: DatasetSource | None = None) -> tuple[str, ...]:
    """``data.classes`` when set, else the dataset's own (``source``, resolved here if not given)."""
    if data_cfg.classes is not None:
        return tuple(data_cfg.classes)
    return (source or dataset_source(data_cfg)).classes


def build_dataset(data_cfg: DictConfig, train: bool, transforms: Transforms | None = None) -> VOCDataset | ConcatDataset:
    """The training data (augmented by ``transforms``, the instantiated ``augment`` group; None: not
    augmented) or the test split (never augmented: detectors resize inputs themselves and map
    detections back to the image). ``data.train_sets`` (a list of (year, split) pairs, as in
    ``data=voc0712``) concatenates several training splits."""
    if not train or transforms is None:
        transforms = test_transforms()
    if train and data_cfg.get("train_sets"):
        parts = [(str(year), str(split)) for year, split in data_cfg.train_sets]
    else:
        parts = [(str(data_cfg.year), str(data_cfg.train_split if train else data_cfg.test_split))]
    source = dataset_source(data_cfg)
    classes = class_names(data_cfg, source)
    datasets = [
        VOCDataset(
            source.root,
            split,
            year=year,
            classes=classes,
            keep_difficult=not train or bool(data_cfg.keep_difficult_train),
            transforms=transforms,
            on_error=str(data_cfg.on_error),
        )
        for year, split in parts
    ]
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def dataset_problems(dataset: VOCDataset | ConcatDataset) -> list[dict[str, Any]]:
    """The load-time problem summaries of every split in ``dataset`` (for results.json)."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return [part.problems.to_dict() for part in parts]


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Detection batches are lists: images differ in size and the detector batches them itself.

    tv_tensors are unwrapped to plain tensors, which is what torchvision's detectors expect.
    """
    images = [image.as_subclass(torch.Tensor) for image, _ in batch]
    targets = []
    for _, target in batch:
        target = dict(target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        targets.append(target)
    return images, targets


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through its epoch, for a mid-epoch resume.

    ``set_start`` drops the samples a checkpointed run already consumed, without loading them
    (loading would also replay their random augmentations and shift the RNG)."""

    start = 0

    def set_start(self, num_samples: int) -> None:
        self.start = num_samples

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def train_loader(dataset: Dataset, batch: int, workers: int, seed: int, world_size: int, rank: int) -> DataLoader:
    """Shuffled by a sampler seeded with (seed, epoch), so each epoch's order is reproducible, which
    an exact resume relies on (see ``start_epoch``). The last incomplete batch is dropped, so a
    BatchNorm never sees a batch of one image."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator(),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def start_epoch(loader: DataLoader, epoch: int, done_batches: int) -> None:
    """Position the training loader at ``done_batches`` into ``epoch``.

    The loader's own generator is re-seeded from (seed, epoch): creating an iterator draws the
    workers' base seed from it, and drawing from the global RNG instead would shift the
    augmentations of a resumed run. With ``data.workers=0`` a mid-epoch resume is bit-exact; with
    workers it is exact at epoch boundaries (each worker's RNG has advanced over the samples it
    already produced in the interrupted epoch).
    """
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    sampler.set_start(done_batches * loader.batch_size)
    loader.generator.manual_seed(sampler.seed * 100_003 + epoch)


def test_loader(dataset: Dataset, batch: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate)
