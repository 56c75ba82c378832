"""What every benchmark row shares: the interleaved runner, the device-synchronised timer, the
``--device`` and ``--tiny`` options, device naming, and a model under training (``Variant``).

Rows compare variants side by side in one process rather than in separate runs, so clock boosts,
thermal drift and other load hit every variant alike and a ratio holds on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from cbn_detect.runtime import synchronize

V = TypeVar("V")


def interleaved_medians(
    variants: Sequence[V], warmup: int, rounds: int, measure: Callable[[V, int], float]
) -> list[float]:
    """Each variant's median over ``rounds`` measurements, after ``warmup`` discarded ones.

    Every round calls ``measure(variant, round)`` once per variant, in an order that rotates round
    by round, so that no variant always runs first, or always right after the same other one.
    """
    kept: list[list[float]] = [[] for _ in variants]
    order = list(range(len(variants)))
    for round_ in range(warmup + rounds):
        shift = round_ % len(order)
        for i in order[shift:] + order[:shift]:
            value = measure(variants[i], round_)
            if round_ >= warmup:
                kept[i].append(value)
    return [statistics.median(values) for values in kept]


def timed_ms(call: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``call()`` in ms, the device synchronised at both ends so that the time covers
    the work ``call`` queues on a GPU, not only its launch."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


@dataclass(frozen=True)
class Variant:
    """One model under training in a row: its label in the table, the model and its optimizer."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.model.parameters()) / 1e6


def timed_train_step(v: Variant, loss: Callable[[nn.Module], Tensor], device: torch.device, bf16: bool) -> float:
    """One training step's time (ms): zero the gradients, ``loss(model)`` (under bf16 autocast
    when asked), backward, optimizer update."""

    def step() -> None:
        v.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value = loss(v.model)
        value.backward()
        v.optimizer.step()

    return timed_ms(step, device)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None: leave torch's), restored after it, so
    a row run in-process (the tests, ``bench gpu``) leaves the caller's setting as it was."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA H200)`` or ``cpu``: a table says which GPU it was measured on."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def parse_with_tiny(
    parser: argparse.ArgumentParser, argv: list[str], preset: dict[str, Any], note: str = ""
) -> argparse.Namespace:
    """Parse ``argv`` with a ``--tiny`` flag that swaps in ``preset`` (a small CPU run, the one the
    tests make). The preset only replaces defaults, so options given explicitly still win."""
    parser.add_argument(
        "--tiny", action="store_true", help=f"CPU preset, explicit options win: {preset}{note and ', ' + note}"
    )
    if "--tiny" in argv:
        parser.set_defaults(**preset)
    return parser.parse_args(argv)
