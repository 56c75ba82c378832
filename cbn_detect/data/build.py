"""Datasets and loaders from the ``data`` config group."""

from __future__ import annotations

import atexit
import ctypes
import functools
import itertools
import logging
import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from cbn_detect.data.seeded import SampleKey, SeededSamples
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


def build_dataset(
    data_cfg: DictConfig, train: bool, transforms: Transforms | None = None
) -> VOCDataset | ConcatDataset:
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
            cache_images=bool(data_cfg.get("cache_images", False)),
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
    """A DistributedSampler that yields (epoch, index) keys and can start part-way through its epoch,
    for a mid-epoch resume.

    The keys let ``SeededSamples`` seed each sample's augmentation from (seed, epoch, index), so it
    does not depend on the loader worker that produces it (see ``cbn_detect.data.seeded``).
    ``set_start`` drops the samples a checkpointed run already consumed, without loading them."""

    start = 0

    def set_start(self, num_samples: int) -> None:
        self.start = num_samples

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return self.num_samples - self.start


# What SLURM sends before it stops a job (SIGTERM, or the --signal the job asked for). It reaches
# every process of the job, loader workers included; the training process checkpoints at the next
# step and then stops its workers itself, but a worker that died of the signal first would make
# that step fail ("DataLoader worker ... is killed by signal") instead.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_exiting: Any = None  # a shared flag, set when the process that started the workers exits


def _exit_flag() -> Any:
    """Set at the exit of this process, before ``multiprocessing``'s own exit hook SIGTERMs the
    workers that are still alive and waits for them (registered later, so run earlier)."""
    global _exiting
    if _exiting is None:
        _exiting = multiprocessing.RawValue(ctypes.c_bool, False)
        atexit.register(_at_exit)
    return _exiting


def _at_exit() -> None:
    _exiting.value = True
    # torch's check for dead workers raises from a SIGCHLD handler; at exit it only adds noise.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _outlive_stop_signals(exiting: Any, worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: the stop signals are ignored until the process that
    started the worker exits. Then they end it, as ``multiprocessing``'s exit hook expects."""

    def handle(signum: int, frame: Any) -> None:
        if exiting.value:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)


def _worker_init(workers: int) -> Callable[[int], None] | None:
    return functools.partial(_outlive_stop_signals, _exit_flag()) if workers > 0 else None


def train_loader(dataset: Dataset, batch: int, workers: int, seed: int, world_size: int, rank: int) -> DataLoader:
    """Shuffled by a sampler seeded with (seed, epoch), so each epoch's order is reproducible, and
    every sample augmented under an RNG seeded with (seed, epoch, index), so its augmentation does
    not depend on ``workers`` or on where an epoch started; an exact resume relies on both (see
    ``start_epoch``). The last incomplete batch is dropped, so a BatchNorm never sees a batch of one
    image."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator(),
        worker_init_fn=_worker_init(workers),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def start_epoch(loader: DataLoader, epoch: int, done_batches: int) -> None:
    """Position the training loader at ``done_batches`` into ``epoch``.

    Together with the checkpointed RNG states this makes a resume bit-exact at any step, with any
    number of workers: the epoch's sample order is a function of (seed, epoch), each sample's
    augmentation one of (seed, epoch, index), and the loading never draws from the training
    process's RNGs. The loader's own generator is re-seeded from (seed, epoch) as well (creating an
    iterator draws the workers' base seeds from it), so that even the workers' global RNG states,
    which no sample draws from, are reproducible.
    """
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    sampler.set_start(done_batches * loader.batch_size)
    loader.generator.manual_seed(sampler.seed * 100_003 + epoch)


def test_loader(dataset: Dataset, batch: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_worker_init(workers),
    )
