"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), as its authors released it, fixed.

Differences from the authors' release, all deliberate: eps inside the square root and the affine
weight initialised to 1 (as in BatchNorm); the plain-BN phase normalizes with the biased variance
(the release used the unbiased one); history and counters live in ``state_dict``; nothing is
hard-coded to CUDA; derivatives come from closed forms instead of extra autograd passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cbn_detect.norm.cbn_math import (
    ConvGeometry,
    RunningStats,
    TaylorInputs,
    WindowInputs,
    WindowResult,
    cbn_window_forward,
    conv_geometry,
    mean_input_patch,
    sq_weight_grad,
    taylor_products,
)
from cbn_detect.norm.dtypes import statistics_dtype
from cbn_detect.norm.producer import ProducerLink
from cbn_detect.runtime.errors import ConfigError

log = logging.getLogger(__name__)

FUSED_CHOICES = ("auto", "on", "off")
# Rows of the per-slot statistics: the stored mean and E[y^2] and, for the Taylor compensation,
# W_s . (d mean / dW) and W_s . (d E[y^2] / dW) under the weight W_s the entry was stored with.
STAT_ROWS = ("mean", "sq", "wpatch", "wdsq")


class WindowDiag(NamedTuple):
    """Small tensors of the latest step, turned into numbers only when diagnostics are read."""

    count: Tensor
    valid: Tensor
    keep: Tensor
    comp_mean: Tensor
    delta_mean: Tensor


@functools.cache
def _compiled_window_forward() -> Callable[..., WindowResult]:
    # dynamic=True: one graph serves every layer shape, instead of one recompilation per layer
    # that would quickly exhaust dynamo's recompile limit (the window fill level is a mask).
    return torch.compile(cbn_window_forward, dynamic=True)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled if it is enabled; otherwise nothing (an autocast context costs microseconds
    a layer, every step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _FusedPath:
    """Whether ``fused="auto"`` may still use the compiled path in this process.

    A machine without a working compiler toolchain for Triton/inductor should cost speed, not a
    crashed training run: the first failure is logged and ``auto`` layers fall back for good.
    """

    usable = True

    @classmethod
    def disable(cls, err: Exception) -> None:
        cls.usable = False
        log.warning("CBN: torch.compile failed (%s: %s); using the reference path", type(err).__name__, err)


class CrossIterationBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose statistics average the current batch with the last ``window - 1`` batches.

    Use it when the per-process batch is too small for BN's statistics (detection from scratch at
    1-4 images per GPU) and synchronising across processes is not wanted or not possible. Stored
    statistics are compensated to the current conv weight by a first-order Taylor expansion
    (``rho=1``; ``rho=0`` is naive CBN, which simply averages stale statistics). The compensation
    covers only this layer's *own* conv weight having changed since an entry was stored; the
    entries are also stale because the layers upstream changed the conv's *input* distribution
    since, and that is not corrected (neither by the paper's method nor here). The ``taylor_rel``
    diagnostic measures the first part only.

    The caller must guarantee:
      * the layer normalizes the output of one ``nn.Conv2d`` (zero padding) and is wired to it by
        ``convert_norm`` (or :meth:`attach`); that conv runs in training mode right before this
        layer on every training forward (a shared conv may run several times, once per norm);
      * exactly one training-mode forward per optimizer step: the history advances on every
        training forward, so gradient accumulation or extra training-mode forwards shift it;
      * a conv bias, if any, changes slowly: only the weight is compensated (as in the release).

    ``burnin`` (default 1000): the first ``burnin`` training forwards are plain BN and fill no
    history. Early in training from scratch the weights move so fast that a first-order correction
    of statistics even a few steps old is poor (the paper reports that a burn-in helps); 1000
    iterations covers the usual detection learning-rate warm-up (detectron2's default), after which
    weight updates are small enough for the Taylor term to be accurate. After burn-in the window
    grows 1, 2, ..., window.

    Under DDP the history is per process (it is not a buffer, so DDP never broadcasts it); it is
    saved through ``get_extra_state`` so a resumed run continues bit for bit. Statistics and
    history are kept in ``statistics_dtype`` of the input: fp32 under autocast and for fp16/bf16
    models, fp64 for fp64 models (the history follows the input's dtype and device, since
    ``Module.to`` does not move it); the output has the input's dtype.
    ``fused``: ``auto`` compiles the statistics and normalization with ``torch.compile`` on CUDA
    only (falling back to the reference path, with a warning, if compilation fails), ``on`` always
    (failures raise), ``off`` never (the reference path).
    """

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        burnin: int = 1000,
        rho: float = 1.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        fused: str = "auto",
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        if window < 1 or burnin < 0 or momentum is None:
            raise ConfigError(
                f"CBN needs norm.window >= 1, norm.burnin >= 0 and a float norm.momentum (no cumulative average), "
                f"got window={window}, burnin={burnin}, momentum={momentum}"
            )
        if fused not in FUSED_CHOICES:
            raise ConfigError(f"norm.fused={fused!r} must be one of {FUSED_CHOICES}")
        self.window = int(window)
        self.burnin = int(burnin)
        self.rho = float(rho)
        self.fused = fused
        self.layer_name = "<CBN not wired by convert_norm>"
        self.num_steps = 0  # training forwards seen, burn-in included
        self._count = 0  # valid history slots, always the first ones
        self._next = 0  # slot the next entry goes to
        self._history: dict[str, Tensor] = {"stats": torch.zeros(self.window - 1, self._stat_rows, num_features)}
        self._link: ProducerLink | None = None
        self._geom: ConvGeometry | None = None
        self._valid_rows: Tensor | None = None
        self._scratch: Tensor | None = None  # where the Taylor contraction writes, reused every step
        self.last_window: WindowDiag | None = None

    _PLAIN_ATTRIBUTES = frozenset({"num_steps", "_count", "_next", "last_window"})

    def __setattr__(self, name: str, value: object) -> None:
        # Counters and the last diagnostics are set several times a step: past Module.__setattr__'s
        # parameter/buffer/submodule bookkeeping (~15 us a set on CPU, 4 sets a layer per step).
        if name in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def needs_producer(self) -> bool:
        """Only the Taylor compensation needs the conv; naive CBN and window 1 do not."""
        return self.rho != 0 and self.window > 1

    @property
    def _stat_rows(self) -> int:
        return len(STAT_ROWS) if self.needs_producer else 2

    def attach(self, link: ProducerLink, layer_name: str) -> None:
        """Wire this layer to the conv it normalizes and preallocate the history for its shape."""
        conv = link.conv
        if conv.out_channels != self.num_features:
            raise ValueError(
                f"CBN layer '{layer_name}' has {self.num_features} channels but its conv produces {conv.out_channels}"
            )
        self._geom = conv_geometry(conv)
        self._link = link
        self.layer_name = layer_name
        slots, kh, kw = self.window - 1, *conv.kernel_size
        like = {"device": conv.weight.device, "dtype": statistics_dtype(conv.weight.dtype)}
        # Per slot: the statistics rows (STAT_ROWS), the mean input patch (per input channel) and
        # d E[y^2] / dW: one weight-shaped tensor, the only large one (no copy of the weight).
        self._history = {
            "stats": torch.zeros(slots, self._stat_rows, self.num_features, **like),
            "patch": torch.zeros(slots, conv.in_channels, kh, kw, **like),
            "dsq": torch.zeros(slots, *conv.weight.shape, **like),
        }

    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        """BatchNorm in eval mode; in training, BatchNorm during burn-in, then the window step.

        TorchDynamo (``train.compile``) does not trace the layer: its per-step counters and history
        slot are Python ints that a graph would guard on, so every training step would recompile
        the whole enclosing graph (minutes each) until dynamo's recompile limit. Run eagerly, the
        layer breaks the graph once and keeps its own compiled path (``fused``).
        """
        if not self.training:
            return super().forward(x)
        return self._training_forward(x)

    def _training_forward(self, x: Tensor) -> Tensor:
        conv_input = self._take_conv_input(x)
        self.num_steps += 1
        if self.num_steps <= self.burnin:
            return super().forward(x)
        return self._window_step(x, conv_input)

    def _take_conv_input(self, x: Tensor) -> Tensor | None:
        if not self.needs_producer:
            return None
        conv_input = self._link.take(x) if self._link is not None else None
        if conv_input is None:
            raise RuntimeError(
                f"CBN layer '{self.layer_name}': its input is not the output of the latest "
                "training-mode call of its producing conv. Wire it with convert_norm and apply it "
                "directly to that conv's output, right after the conv runs."
            )
        return conv_input

    def _window_step(self, x: Tensor, conv_input: Tensor | None) -> Tensor:
        inputs = self._window_inputs(x)
        # Autocast would run the Taylor contraction (bmm) in bf16; statistics stay in the statistics
        # dtype.
        with _autocast_off(x.device.type):
            res = self._run_window_forward(inputs, x.is_cuda)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.window > 1:
                self._push(res, x, conv_input)
        self.last_window = WindowDiag(res.count, inputs.valid, res.keep, res.comp_mean, res.delta_mean)
        return res.out

    def _window_inputs(self, x: Tensor) -> WindowInputs:
        """This step's inputs: the history on x's device in x's statistics dtype, masked to the
        slots filled so far."""
        history = self._history_on(x.device, statistics_dtype(x.dtype))
        stats = history["stats"]
        taylor = None
        if self.needs_producer:
            taylor = TaylorInputs(
                w_now=self._link.conv.weight.detach(),
                hist_patch=history["patch"],
                hist_dsq=history["dsq"],
                hist_offset=stats[:, 2:],
                groups=self._geom.groups,
                scratch=history["scratch"],
            )
        return WindowInputs(
            y=x,
            weight=self.weight,
            bias=self.bias,
            eps=self.eps,
            rho=self.rho,
            hist_mean=stats[:, 0],
            hist_sq=stats[:, 1],
            valid=history["valid_rows"][self._count],  # a view: no kernel launch
            taylor=taylor,
            running=RunningStats(self.running_mean, self.running_var, self.momentum),
        )

    def _run_window_forward(self, inputs: WindowInputs, on_cuda: bool) -> WindowResult:
        """``cbn_window_forward`` through ``torch.compile`` (the fused path) or not, as ``fused`` says
        (see the class docstring); which of its paths computes the step is chosen inside it. The
        compiled graph is not given ``filled``: see ``WindowInputs``."""
        if self.fused == "on":
            return _compiled_window_forward()(**inputs._asdict())
        if self.fused == "auto" and on_cuda and _FusedPath.usable:
            try:
                return _compiled_window_forward()(**inputs._asdict())
            except Exception as err:  # noqa: BLE001 - any compiler failure; real errors recur below
                _FusedPath.disable(err)
        return cbn_window_forward(**inputs._asdict(), filled=self._count)

    def _push(self, res: WindowResult, y: Tensor, conv_input: Tensor | None) -> None:
        """Write this step's entry in place (``out=``): no copy of the weight, one kernel per field
        (the derivative is written by the multiply that scales it).

        The offsets ``W_s . patch_s`` and ``W_s . dsq_s`` need no contraction when the conv ran in
        the statistics dtype: y = W_s * x + b is its own output, so ``W_s . patch_s = E[y] - b``
        and ``W_s . dsq_s = 2/M sum y (y - b) = 2 (E[y^2] - b E[y])``, per channel, from the
        statistics just stored (equal to the contraction up to fp32 rounding; a test checks it).
        Under autocast the conv ran on bf16/fp16 copies of W and x, so the identity holds only to
        their rounding (~1e-4 of E[y^2], about a tenth of a typical Taylor term): there the offsets
        are contracted with the fp32 weight, consistent with how the term is formed."""
        slot, history = self._next, self._history
        stats = history["stats"][slot]
        stats[0].copy_(res.cur_mean)
        torch.addcmul(res.cur_var, res.cur_mean, res.cur_mean, out=stats[1])
        if self.needs_producer:
            conv = self._link.conv
            mean_input_patch(conv_input, self._geom, tuple(y.shape[-2:]), out=history["patch"][slot])
            sq_weight_grad(conv_input, y, self._geom, out=history["dsq"][slot], weight=conv.weight)
            if y.dtype != stats.dtype:
                taylor_products(
                    conv.weight.detach(),
                    history["patch"][slot : slot + 1],
                    history["dsq"][slot : slot + 1],
                    self._geom.groups,
                    out=stats[2:],
                )
            elif conv.bias is None:
                stats[2].copy_(stats[0])
                torch.mul(stats[1], 2.0, out=stats[3])
            else:
                bias = conv.bias.detach().to(stats.dtype)
                torch.sub(stats[0], bias, out=stats[2])
                torch.addcmul(stats[1], bias, stats[0], value=-1.0, out=stats[3]).mul_(2.0)
        self._next = (slot + 1) % (self.window - 1)
        self._count = min(self._count + 1, self.window - 1)

    def step_state(self) -> tuple[tuple[int, int, int], dict[str, Tensor]]:
        """What the next training forward changes besides the running buffers, so that a step found
        bad can be undone (see ``norm.rollback``): the counters, and *views* of the one history slot
        that forward overwrites (none in eval mode, during burn-in or at window 1). The caller
        copies the views before the forward; :meth:`restore_step_state` puts the copies back."""
        counters = (self.num_steps, self._count, self._next)
        if not self.training or self.window == 1 or self.num_steps < self.burnin:
            return counters, {}
        slot = self._next
        return counters, {k: v[slot] for k, v in self._history.items()}

    def restore_step_state(self, counters: tuple[int, int, int], slot: dict[str, Tensor]) -> None:
        """Undo the one training forward since :meth:`step_state` returned ``counters``, given copies
        of the slot views it returned (written into the history as it is now: that forward may have
        moved it to the input's device and dtype)."""
        self.num_steps, self._count, self._next = counters
        with torch.no_grad():
            for key, saved in slot.items():
                self._history[key][self._next].copy_(saved)

    def _history_on(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """The history on ``device`` in ``dtype``, plus ``valid_rows[n]``: the slot mask when n
        slots are full."""
        # The history is not a buffer (see class docstring), so Module.to() does not move it.
        current = self._history["stats"]
        if current.device != device or current.dtype != dtype:
            self._history = {k: v.to(device, dtype) for k, v in self._history.items()}
        if self._valid_rows is None or self._valid_rows.device != device:
            slots = torch.arange(self.window - 1, device=device)
            self._valid_rows = slots[None, :] < torch.arange(self.window, device=device)[:, None]
        current = self._history["stats"]
        if self._scratch is None or self._scratch.device != device or self._scratch.dtype != dtype:
            self._scratch = current.new_empty(2, self.num_features, self.window - 1)
        return {**self._history, "valid_rows": self._valid_rows, "scratch": self._scratch}

    def history_bytes(self) -> int:
        """Memory held by the stored window (all slots, every field)."""
        return sum(v.numel() * v.element_size() for v in self._history.values())

    def _named_history(self) -> dict[str, Tensor]:
        """The history as named fields (views): the statistics rows, then patch and dsq."""
        stats = self._history["stats"]
        named = {name: stats[:, i] for i, name in enumerate(STAT_ROWS[: stats.shape[1]])}
        named.update((k, v) for k, v in self._history.items() if k != "stats")
        return named

    _version = 3
    """The layout of the state this layer saves. torch records it per layer in the state dict's
    metadata and :meth:`_load_from_state_dict` converts older ones. 3: the history holds, per slot,
    the rows of :data:`STAT_ROWS`, ``patch`` and ``dsq``. 2, or none recorded: BatchNorm's version,
    which CBN carried before it had its own; such a history is either version 3's or, saved before
    the weight copies were dropped, one with ``weight`` (a copy of the conv weight per slot) where
    version 3 has ``wpatch`` and ``wdsq``."""

    def get_extra_state(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "count": self._count,
            "next": self._next,
            "history": {k: v.clone() for k, v in self._named_history().items()},
        }

    def set_extra_state(self, state: dict) -> None:
        saved = state["history"]
        expected = self._named_history()
        mismatch = set(saved) != set(expected) or any(saved[k].shape != v.shape for k, v in expected.items())
        if mismatch:
            raise ValueError(
                f"CBN layer '{self.layer_name}': checkpoint history "
                f"{ {k: tuple(v.shape) for k, v in saved.items()} } does not fit this layer "
                f"{ {k: tuple(v.shape) for k, v in expected.items()} } (different window or "
                "conv, or a checkpoint saved before convert_norm)"
            )
        # The saved dtype is kept (a float64 run resumes in float64, not rounded through the fp32
        # history a freshly built layer holds); the device is this layer's.
        device = self._history["stats"].device
        rows = STAT_ROWS[: self._history["stats"].shape[1]]
        history = {"stats": torch.stack([saved[k] for k in rows], dim=1).to(device)}
        history.update((k, saved[k].to(device, copy=True)) for k in self._history if k != "stats")
        self._history = history
        self.num_steps, self._count, self._next = state["num_steps"], state["count"], state["next"]

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Convert a history saved under an older :attr:`_version` to this version's layout, then
        load as torch does (BatchNorm converts its own older buffers the same way)."""
        key = prefix + "_extra_state"
        version = local_metadata.get("version")
        if (version is None or version < 3) and key in state_dict and "weight" in state_dict[key]["history"]:
            # Version 2 does not say which of its two layouts a history has: the weight copies do.
            old = state_dict[key]
            state_dict[key] = {**old, "history": self._convert_weight_copies(dict(old["history"]))}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _convert_weight_copies(self, saved: dict[str, Tensor]) -> dict[str, Tensor]:
        """A history saved before the weight copies were dropped (fields mean, sq, patch, dsq and
        weight, a copy of the conv weight per slot) in today's layout: ``wpatch``/``wdsq`` are
        the stored weight contracted with the stored derivatives, exactly what a new entry keeps."""
        if self._geom is None or saved["weight"].shape[1:] != self._geom.weight_shape or "patch" not in saved:
            return saved  # reported as a mismatch by the caller, with the shapes
        weights = saved.pop("weight")
        offsets = [
            taylor_products(weights[s], saved["patch"][s : s + 1], saved["dsq"][s : s + 1], self._geom.groups)[0]
            for s in range(weights.shape[0])
        ]
        offsets = torch.stack(offsets) if offsets else weights.new_zeros(0, 2, self.num_features)
        log.info("CBN layer '%s': converted a checkpoint history with weight copies", self.layer_name)
        return {**saved, "wpatch": offsets[:, 0], "wdsq": offsets[:, 1]}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}, rho={self.rho}"
