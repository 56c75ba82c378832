"""Progress of a long loop, for the person waiting: a tqdm bar on a terminal, one compact log line
every few seconds elsewhere (SLURM logs, a pipe), where a bar would be a wall of carriage returns.

Training, evaluation and FPS all report through :class:`Progress`; what they share (the mode, the
interval, the job's name) is one :class:`ProgressSettings` made once by the composition root. A line
reads ``retinanet_tiny/bn/b4/s0 train 120/480 steps (25%) epoch 3/12 loss 0.532, 18.4 img/s, ETA 2m05s``:
the job's name first when several jobs share a console (a multirun, several processes), then what
is running, how far, its own fields, the rate and the estimated time left.

The rate and the ETA leave out the first update (the first step pays for loader start-up, lazy
initialisation, cuDNN autotuning, compilation), so they describe the steady state.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

from cbn_detect.runtime.errors import ConfigError

log = logging.getLogger("cbn_detect.progress")

MODES = ("auto", "bar", "lines", "off")
"""``auto``: a bar on a terminal, lines elsewhere. ``on`` is read as ``bar`` (its old meaning)."""


@dataclass(frozen=True)
class ProgressSettings:
    """How loops report their progress: ``mode`` (resolved: ``bar``, ``lines`` or ``off``), a line
    every ``every_s`` seconds in ``lines`` mode (0: every update), ``name`` before every line and
    as the bar's label (empty: none)."""

    mode: str = "off"
    every_s: float = 30.0
    name: str = ""

    @classmethod
    def resolve(
        cls, mode: str, every_s: float, name: str = "", *, main: bool = True, stream: TextIO | None = None
    ) -> ProgressSettings:
        """``train.progress`` made concrete: ``auto`` is a bar when ``stream`` (stderr, where tqdm
        draws) is a terminal, else lines; a process other than the job's main one reports nothing."""
        mode = "bar" if mode == "on" else mode
        if mode not in MODES:
            raise ConfigError(f"train.progress={mode} is not one of {', '.join(MODES)}")
        if float(every_s) < 0:
            raise ConfigError(f"train.progress_every_s={every_s} must be 0 or more seconds")
        if mode == "auto":
            stream = sys.stderr if stream is None else stream
            mode = "bar" if _isatty(stream) else "lines"
        return cls(mode if main else "off", float(every_s), name)

    def track(self, what: str, total: int, *, unit: str = "item", initial: int = 0) -> Progress:
        return Progress(self, what, total, unit=unit, initial=initial)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``4m05s``, ``3h07m``, ``2d04h``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _rate(value: float) -> str:
    """``0.0408``, ``4``, ``18.4``, ``1250``: three significant digits, never an exponent."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """``total`` items of work (steps, images), ``initial`` of them done before (a resumed run).

    ``update(n, images=k, **fields)`` after each piece of work: ``n`` items and ``k`` images done
    (the rate is in images per second when images are counted, else in items), ``fields`` shown as
    they are (``epoch="3/12"``, ``loss=0.53``). ``clock`` is for tests.
    """

    def __init__(
        self,
        settings: ProgressSettings,
        what: str,
        total: int,
        *,
        unit: str = "item",
        initial: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings
        self.what = what
        self.total = int(total)
        self.unit = unit
        self.done = int(initial)
        self._clock = clock
        self._start = clock()
        self._last_line = self._start
        self._first_at: float | None = None  # when the first update ended: the rate starts there
        self._first_done = self.done
        self._images = 0  # images since the first update
        self._fields: dict[str, Any] = {}
        self._bar = None
        if settings.mode == "bar":
            desc = f"{settings.name} {what}" if settings.name else what
            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    @property
    def measured_items(self) -> int:
        """Items done since the first update: what the rate is measured over."""
        return 0 if self._first_at is None else self.done - self._first_done

    @property
    def measured_s(self) -> float:
        return 0.0 if self._first_at is None else self._clock() - self._first_at

    def seconds_per_item(self) -> float:
        """Seconds per item after the first update (the first itself when it is all there is)."""
        if self._first_at is None:
            return math.nan
        if self.measured_items > 0:
            return self.measured_s / self.measured_items
        return (self._first_at - self._start) / max(self._first_done, 1)

    def remaining_s(self) -> float:
        return max(self.total - self.done, 0) * self.seconds_per_item()

    def images_per_s(self) -> float:
        seconds = self.measured_s
        return self._images / seconds if self._images and seconds > 0 else math.nan

    def update(self, n: int = 1, *, images: int = 0, **fields: Any) -> None:
        self.done += n
        now = self._clock()
        if self._first_at is None:
            self._first_at, self._first_done = now, self.done
        else:
            self._images += images
        self._fields = fields
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _field(v) for k, v in fields.items()}, refresh=False)
        elif self.settings.mode == "lines":
            if now - self._last_line >= self.settings.every_s or self.done >= self.total:
                self._last_line = now
                log.info("%s", self.line())

    def line(self) -> str:
        """The progress line: ``[name] what done/total units (pct%) fields, rate, ETA``."""
        head = f"{self.settings.name} {self.what}" if self.settings.name else self.what
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{head} {self.done}/{self.total} {self.unit}s ({pct:.0f}%)"]
        parts += [f"{k} {_field(v)}" for k, v in self._fields.items()]
        text = " ".join(parts)
        rate = self.images_per_s()
        if math.isfinite(rate):
            text += f", {_rate(rate)} img/s"
        else:
            per_item = self.seconds_per_item()
            if math.isfinite(per_item) and per_item > 0:
                text += f", {_rate(1 / per_item)} {'img' if self.unit == 'image' else self.unit}/s"
        if self.done < self.total:
            text += f", ETA {format_duration(self.remaining_s())}"
        else:
            text += f", done in {format_duration(self._clock() - self._start)}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
