"""Checkpoints hold everything a run needs to continue bit for bit: weights (norm state and CBN
history included), optimizer, schedule, fp16 loss scale, progress inside the epoch and every RNG,
plus the run's composed config (``config``), so that a checkpoint copied out of its run folder can
still be evaluated on its own. Written atomically, with the layout's version (``format``): a
checkpoint of an older layout is converted on reading by :func:`current_layout`, the one place that
knows the old layouts, and one of a newer layout is refused. The modules inside ``model`` version
their own state the way torch does (``_version``, converted in their ``_load_from_state_dict``).

Reading one for anything but a resume goes through :func:`read_checkpoint` (a truncated file is
named as such), and :func:`compare_state_dicts` says why saved weights do not fit a model: another
detector, another norm, or another number of classes, told apart by the state-dict keys alone."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


FORMAT = 2
"""The payload layout :func:`save_checkpoint` writes, stored in it as ``format``. Any change to its
keys or to what they hold takes the next number and a conversion from the previous layout in
:func:`current_layout`, so that readers index every key without asking whether it is there."""

UNVERSIONED = 1
"""The format of a checkpoint without ``format``: written before the payload recorded its layout."""


def current_layout(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """``payload`` in the layout of :data:`FORMAT`, converted step by step from the format it
    records. Format 1 holds ``scaler`` only since mixed precision (before, every run was fp32: an
    empty scaler state) and ``config`` only since checkpoints carry the run's config. A format
    this code does not know (a newer one) is a :class:`CheckpointError` naming the file and both
    formats: reading it as a known one would misread whatever changed."""
    version = payload.get("format", UNVERSIONED)
    if not isinstance(version, int) or not UNVERSIONED <= version <= FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is format {version!r}, which this cbn_detect does not know (it reads formats "
            f"{UNVERSIONED} to {FORMAT}): read it with the cbn_detect that wrote it, or move it away to start over"
        )
    if version < 2:
        payload = {"scaler": {}, "config": None, **payload}
    return {**payload, "format": FORMAT}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    precision: Precision,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Write the checkpoint atomically. ``config``: the run's composed config as plain containers
    (what ``<run_dir>/.hydra/config.yaml`` holds, interpolations kept), stored as ``config`` (None
    without one) so that ``cbn_detect.evaluate`` can rebuild the model from the checkpoint file
    alone; resuming ignores it."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": precision.state_dict(),
        "state": asdict(state),
        "rng": rng_state(),
        "config": None if config is None else dict(config),
    }
    io.save_torch(path, payload)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
) -> TrainState:
    """Restore in place and return the saved progress. A checkpoint that cannot be read is a
    :class:`CheckpointError` naming it and the way to start over: silently starting over would
    discard the run's work. So is one of a newer format (see :func:`current_layout`)."""
    try:
        payload = current_layout(torch.load(path, map_location="cpu", weights_only=False), path)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        precision.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        state = TrainState(**payload["state"])
    except CheckpointError:
        raise  # a format this code does not know, already said in one line
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


ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of every file torch.save writes (a zip archive since torch 1.6)."""


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The payload :func:`save_checkpoint` wrote, on the CPU, in the current layout (see
    :func:`current_layout`); ``mmap`` maps the tensors instead of reading them (a cheap look at the
    config or progress of a large checkpoint).

    A file torch cannot read is a :class:`CheckpointError` naming it in one line: "corrupt or
    truncated" for an empty file or a damaged zip archive (a copy cut short or a full disk leaves
    one; torch then reports a missing zip "central directory", or EOFError), else "not a checkpoint".
    The user can act on either, so neither keeps torch's traceback."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path} ({err.strerror or err})") from err
    if not head:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (an empty file)")
    is_zip = head == ZIP_MAGIC
    try:
        # mmap needs the zip format; anything else is read whole (and fails below if foreign)
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and is_zip)
    except Exception as err:  # torch raises several types for truncated or foreign files
        if is_zip or isinstance(err, EOFError):
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({_first_sentence(err)})") from err
        raise CheckpointError(f"{path} is not a checkpoint torch can read ({_first_sentence(err)})") from err
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not a cbn_detect checkpoint (no 'model' weights in it)")
    return current_layout(payload, path)


NORM_KINDS: dict[str, str] = {
    "BatchNorm": "running_mean, running_var and num_batches_tracked: bn, syncbn or brn",
    "CBN": "BatchNorm's keys plus its history in _extra_state: cbn or cbn_naive",
    "FrozenBN": "running_mean and running_var, no num_batches_tracked",
    "GroupNorm": "weight and bias only, no running_mean/running_var",
}
"""The norm layers a state dict can reveal, with the keys that reveal them. bn, syncbn and brn
keep the same keys (so do cbn and cbn_naive): their weights load into one another."""

DETECTOR_HEADS: dict[str, str] = {
    "head.classification_head.cls_logits.": "RetinaNet",
    "head.classification_head.module_list.": "SSD",
}
"""Key prefixes that name the detector family (``models.retinanet`` / ``models.ssd`` heads)."""

CLASSIFICATION = "classification_head."
"""Keys of the class-score layers: the only ones whose size follows the number of classes."""

Shape = tuple[int, ...]


def norm_layers(state: Mapping[str, Any]) -> dict[str, str]:
    """Module path -> kind (a key of :data:`NORM_KINDS`) of every norm layer of a detector's state
    dict, told by the layer's keys: BN-like layers by their buffers (CBN adds its history as
    ``_extra_state``, FrozenBN counts no batches), GroupNorm as a module with only a 1-D weight and
    bias (convs have 4-D weights). norm=none leaves no norm layer at all (its convs get biases)."""
    fields: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        fields[module][name] = value
    kinds: dict[str, str] = {}
    for module, named in fields.items():
        if "running_mean" in named:
            kinds[module] = (
                "CBN" if "_extra_state" in named else "BatchNorm" if "num_batches_tracked" in named else "FrozenBN"
            )
        elif set(named) == {"weight", "bias"} and len(_shape(named["weight"]) or ()) == 1:
            kinds[module] = "GroupNorm"
    return kinds


def detector_family(state: Mapping[str, Any]) -> str | None:
    """ "RetinaNet", "SSD" or None (neither head found), from the keys of a detector's state dict."""
    for prefix, family in DETECTOR_HEADS.items():
        if any(key.startswith(prefix) for key in state):
            return family
    return None


def _shape(value: Any) -> Shape | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _layers(keys: list[str], state: Mapping[str, Any]) -> list[str]:
    """The conv (and linear) weights among ``keys``: the layers a detector is made of, present
    whatever its norm (a norm changes only norm keys and conv biases)."""
    return [k for k in keys if k.endswith(".weight") and len(_shape(state[k]) or ()) >= 2]


@dataclass(frozen=True)
class StateDictDiff:
    """How saved weights differ from a model's own state dict, and what that says.

    ``model_differs``: other layers (keys of conv weights missing or unexpected, or of other sizes
    outside the class scores), i.e. another detector or other model settings. ``norm_differs``:
    the same layers but other norm layers (another kind, or in other places: ``norm.where``).
    ``classes_differ``: the same model and norm, only the class-score layers sized for another
    number of classes. All three false but ``fits`` false: a difference none of them explains."""

    missing: list[str]
    unexpected: list[str]
    resized: dict[str, tuple[Shape, Shape]]
    """key -> (saved shape, the model's shape), for keys both have."""
    saved_layers: list[str]
    model_layers: list[str]
    saved_norms: dict[str, str]
    model_norms: dict[str, str]
    saved_family: str | None
    model_family: str | None

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.resized)

    @property
    def logits_resized(self) -> dict[str, tuple[Shape, Shape]]:
        """Resized class-score keys whose sizes differ in the first (output) dimension only."""
        return {
            k: (saved, ours)
            for k, (saved, ours) in self.resized.items()
            if CLASSIFICATION in k and len(saved) == len(ours) and saved[1:] == ours[1:]
        }

    @property
    def other_resized(self) -> dict[str, tuple[Shape, Shape]]:
        return {k: v for k, v in self.resized.items() if k not in self.logits_resized}

    @property
    def model_differs(self) -> bool:
        return bool(self.saved_layers or self.model_layers or self.other_resized) or (
            self.saved_family != self.model_family
        )

    @property
    def norm_differs(self) -> bool:
        kinds_differ = set(self.saved_norms.values()) != set(self.model_norms.values())
        placed_differently = not self.model_differs and set(self.saved_norms) != set(self.model_norms)
        return kinds_differ or placed_differently

    @property
    def classes_differ(self) -> bool:
        return not self.model_differs and bool(self.logits_resized)

    def evidence(self, limit: int = 3) -> str:
        """A few keys (``limit`` at most) that show the first difference of model, norm, classes:
        ``missing a, b; unexpected c`` (missing: the model has it, the checkpoint not)."""
        if self.model_differs:
            groups = [
                ("unexpected", self.saved_layers),
                ("missing", self.model_layers),
                ("resized", [_resized(k, *self.other_resized[k]) for k in self.other_resized]),
            ]
        elif self.norm_differs or not self.resized:
            groups = [("missing", self.missing), ("unexpected", self.unexpected)]
        else:
            groups = [("resized", [_resized(k, *v) for k, v in self.resized.items()])]
        picked: dict[str, list[str]] = {label: [] for label, _ in groups}
        pending = [(label, list(keys)) for label, keys in groups if keys]
        taken = 0
        while pending and taken < limit:  # round robin: one of each kind before a second of any
            for label, keys in pending:
                if taken < limit and keys:
                    picked[label].append(keys.pop(0))
                    taken += 1
            pending = [(label, keys) for label, keys in pending if keys]
        return "; ".join(f"{label} {', '.join(keys)}" for label, keys in picked.items() if keys)


def _resized(key: str, saved: Shape, ours: Shape) -> str:
    return f"{key} {_dims(saved)} (model: {_dims(ours)})"


def _dims(shape: Shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def compare_state_dicts(saved: Mapping[str, Any], model: Mapping[str, Any]) -> StateDictDiff:
    """Compare a checkpoint's weights with a freshly built model's ``state_dict()`` (``strict``
    loading fails exactly when the result does not ``fit``)."""
    missing = [k for k in model if k not in saved]
    unexpected = [k for k in saved if k not in model]
    resized = {
        k: (_shape(saved[k]), _shape(model[k]))
        for k in model
        if k in saved
        and _shape(model[k]) is not None
        and _shape(saved[k]) is not None
        and _shape(saved[k]) != _shape(model[k])
    }
    return StateDictDiff(
        missing=missing,
        unexpected=unexpected,
        resized=resized,
        saved_layers=_layers(unexpected, saved),
        model_layers=_layers(missing, model),
        saved_norms=norm_layers(saved),
        model_norms=norm_layers(model),
        saved_family=detector_family(saved),
        model_family=detector_family(model),
    )
