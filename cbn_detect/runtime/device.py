"""The device a run computes on: choosing it, its cuDNN autotuning, and waiting for its work."""

from __future__ import annotations

import torch

from cbn_detect.runtime.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:  # torch's "Expected one of cpu, cuda, ... device type at start of ..."
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was requested but torch sees no CUDA device; use device=auto or cpu")
    return device


def set_cudnn_benchmark(enabled: bool) -> None:
    # Kept out of train.py: submitit pickles ``python -m cbn_detect.train``'s functions by value, and
    # cloudpickle cannot pickle torch.backends.cudnn (a module subclass) when a global refers to it.
    torch.backends.cudnn.benchmark = enabled


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
