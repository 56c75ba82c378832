"""Checkpoints hold everything a run needs to continue bit for bit: weights (norm state and CBN
history included), optimizer, schedule, fp16 loss scale, progress inside the epoch and every RNG. Written atomically."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cbn_detect.engine.precision import Precision
from cbn_detect.runtime import io, rng_state, set_rng_state
from cbn_detect.runtime.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Progress of a run.

    ``epoch`` counts completed epochs and ``epoch_step`` the iterations done in the current one
    (non-zero only in a checkpoint written mid-epoch, on a signal). ``epoch_losses`` holds the
    finite per-iteration losses of the current epoch, or of the last one once it completed: the
    loss variance comes from them. ``recent_losses`` is the sliding window of the last iterations.
    """

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    train_time_s: float = 0.0
    epoch_losses: list[float] = field(default_factory=list)
    recent_losses: list[float] = field(default_factory=list)
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    precision: Precision,
) -> None:
    io.save_torch(
        path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": precision.state_dict(),
            "state": asdict(state),
            "rng": rng_state(),
        },
    )


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
) -> TrainState:
    """Restore in place and return the saved progress. A checkpoint that cannot be read is a
    :class:`CheckpointError` naming it and the way to start over: silently starting over would
    discard the run's work."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        precision.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        state = TrainState(**payload["state"])
    except Exception as err:  # torch raises several types for truncated, foreign or mismatched files
        raise CheckpointError(
            f"cannot resume from checkpoint {path} ({_first_sentence(err)}); move it away, or rerun with "
            "train.resume=never to start over"
        ) from err
    log.info("resumed from %s at epoch %d (+%d steps), step %d", path, state.epoch, state.epoch_step, state.step)
    return state


def _first_sentence(err: Exception, limit: int = 200) -> str:
    """The gist of torch's message: its first line up to the first full stop (torch goes on for a
    paragraph about zip archives, or lists every missing key), prefixed by the exception's type."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
