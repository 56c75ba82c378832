"""Per-sample random draws: a training sample's augmentation is a function of (seed, epoch, index).

Augmentations draw from the process's global RNGs (torchvision's ``transforms.v2`` from torch's;
other libraries from python's ``random`` or numpy's). Left at that, a sample's augmentation depends
on which loader worker produced it and on how many samples that worker produced before, so it
changes with ``data.workers`` and is lost when a run resumes: persistent workers carry their RNG
state across epochs, and fresh workers after a resume start from other seeds. Here every sample is
loaded inside its own RNG scope, seeded from (seed, epoch, index) and restored afterwards:

- the same sample in the same epoch is augmented identically with any number of workers, in any
  process of a distributed run, and at any position of a resumed epoch; an exact resume needs no
  loader or worker state in the checkpoint;
- the loading process's own RNG streams are left untouched, so with ``data.workers=0`` the training
  step's random draws (restored from the checkpoint on resume) do not depend on the data either.

We chose this over torchdata's ``StatefulDataLoader``: no new dependency, the checkpoint stays as it
is, and the augmentations no longer depend on the worker count at all, which checkpointing every
worker's RNG state would not give (a resume with another ``data.workers`` would still differ).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SampleKey = tuple[int, int]  # (epoch, dataset index)

_MASK64 = 2**64 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a well-mixed function of (seed, epoch, index) and nothing else (not
    python's salted ``hash``): numpy's ``SeedSequence`` hashes the three into independent streams."""
    low, high = np.random.SeedSequence([seed & _MASK64, epoch, index]).generate_state(2, np.uint32)
    return int(low) | int(high) << 32


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's (CPU), python's and numpy's global RNGs from ``seed`` for the body, then restore
    the states they had before, so that the caller's streams are as if the body never drew."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that seeds CUDA's too
            random.seed(seed)
            np.random.seed([seed & 0xFFFF_FFFF, seed >> 32])
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SeededSamples(Dataset):
    """``dataset`` indexed by (epoch, index) keys (``ResumableSampler`` yields them): item ``(e, i)``
    is ``dataset[i]`` loaded and augmented under ``seeded_rngs(sample_seed(seed, e, i))``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        epoch, index = key
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]
