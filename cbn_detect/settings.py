"""The run's settings as the entrypoints read them: declared once, typed and checked where they are
read from the composed config (``python -m cbn_detect.train``, ``evaluate``).

A typed loader rather than Hydra structured configs: the YAML tree stays the one place that states
the values (``--cfg job`` shows them as before), unknown keys are already refused before Hydra runs
(``cbn_detect.overrides``), and the model, norm and data nodes are checked by the callables that take
them (``_target_``, ``build_norm``). What is checked here is that each value has the type and, where
nothing downstream checks it, one of the values its key allows: a mistake is one line naming the key
(a :class:`ConfigError`) instead of a ``ValueError`` deep in a run. Values a component interprets
check themselves with their own one line: ``train.amp`` (``Precision``), ``train.progress``
(``ProgressSettings``), ``device`` (``resolve_device``), ``eval.metrics`` (the VOC AP protocols).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig

from cbn_detect.engine.diagnostics import LEVELS
from cbn_detect.engine.trainer import LoopSettings
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.progress import ProgressSettings

RESUME_MODES = ("auto", "never")
"""``train.resume``: continue from ``checkpoints/last.pt`` when there is one, or start over."""

T = TypeVar("T")


def integer(key: str, value: Any) -> int:
    """A count; a float only when whole and a string only when it spells one (an ``${oc.env:...}``
    interpolation is a string), so that ``data.batch=2.5`` is refused rather than truncated."""
    if not isinstance(value, bool):
        try:
            if float(value) == int(value):
                return int(value)
        except (TypeError, ValueError, OverflowError):  # not a number; inf or nan
            pass
    raise ConfigError(f"{key}={value!r} must be an integer")


def real(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be a number") from None


def flag(key: str, value: Any) -> bool:
    """Only true or false: ``bool("false")`` would be True."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} must be one of {', '.join(choices)}")
    return str(value)


def names(key: str, value: Any) -> tuple[str, ...]:
    """A list of names (a single string would otherwise read as its letters)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{key}={value!r} must be a list, e.g. [{value}]")
    return tuple(str(v) for v in value)


def optional(read: Callable[[str, Any], T], key: str, value: Any) -> T | None:
    """``read`` for a setting whose null means "none" (no clipping, torch's thread count, never)."""
    return None if value is None else read(key, value)


@dataclass(frozen=True)
class RunSettings:
    """The configuration values the composition roots (training, evaluation) use, typed and read once."""

    batch: int
    workers: int
    seed: int
    epochs: int
    threads: int | None
    device: str
    amp: str
    resume: str
    progress: str
    progress_every_s: float
    slow_warning_h: float | None
    cudnn_benchmark: bool
    eval_every: int
    eval_batch: int
    metrics: tuple[str, ...]
    coco: bool
    fps_images: int
    fps_warmup: int
    log_images: int
    image_score: float
    test_split: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSettings:
        """A key the config lacks raises as OmegaConf does; a value of the wrong kind, ConfigError."""
        train, evaluation = cfg.train, cfg.eval
        return cls(
            batch=integer("data.batch", cfg.data.batch),
            workers=integer("data.workers", cfg.data.workers),
            seed=integer("seed", cfg.seed),
            epochs=integer("train.epochs", train.epochs),
            threads=optional(integer, "threads", cfg.threads),
            device=str(cfg.device),
            amp=str(train.amp),
            resume=choice("train.resume", train.resume, RESUME_MODES),
            progress=str(train.progress),
            progress_every_s=real("train.progress_every_s", train.progress_every_s),
            slow_warning_h=optional(real, "train.slow_warning_h", train.slow_warning_h),
            cudnn_benchmark=flag("train.cudnn_benchmark", train.cudnn_benchmark),
            eval_every=integer("eval.every", evaluation.every),
            eval_batch=integer("eval.batch", evaluation.batch),
            metrics=names("eval.metrics", evaluation.metrics),
            coco=flag("eval.coco", evaluation.coco),
            fps_images=integer("eval.fps_images", evaluation.fps_images),
            fps_warmup=integer("eval.fps_warmup", evaluation.fps_warmup),
            log_images=integer("eval.log_images", evaluation.log_images),
            image_score=real("eval.image_score", evaluation.image_score),
            test_split=str(cfg.data.test_split),
        )


def loop_settings(
    cfg: DictConfig, progress: ProgressSettings | bool, slow_warning_h: float | None = None
) -> LoopSettings:
    """The training loop's settings from the config; ``progress`` and ``slow_warning_h`` as the
    composition root resolved them for this process (only the main one reports)."""
    train, diagnostics = cfg.train, cfg.diagnostics
    return LoopSettings(
        epochs=integer("train.epochs", train.epochs),
        max_grad_norm=optional(real, "train.max_grad_norm", train.max_grad_norm),
        log_every=integer("train.log_every", train.log_every),
        progress=progress,
        slow_warning_h=slow_warning_h,
        max_nonfinite=integer("train.max_nonfinite", train.max_nonfinite),
        loss_window=integer("train.loss_window", train.loss_window),
        diagnostics=choice("diagnostics.level", diagnostics.level, LEVELS),
        diagnostics_every=integer("diagnostics.every", diagnostics.every),
    )
