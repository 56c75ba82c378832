"""Weights & Biases behind the ``MetricSink`` interface, built so that W&B can never stop training.

W&B is a convenience on top of the files every run writes anyway (``metrics.jsonl``,
``results.json``), so every W&B failure ends in one warning and a fallback, never in an exception or
a hang:

- ``online`` that cannot start (no API key, unreachable or unresponsive server, login prompt timed
  out) falls back to ``offline``: nothing is lost, and ``wandb sync <run_dir>/wandb/offline-run-*``
  uploads the run later. Once online has failed in a process, later runs of the same process (the
  jobs of a local multirun) go offline at once instead of waiting for the timeout again.
- ``offline`` that cannot start (unwritable directory, broken install) falls back to no W&B.
- A call that fails during training (the W&B service died) disables the sink with one warning.

W&B never prompts: without an API key, ``wandb.init`` on a terminal asks for one and waits forever
(e.g. inside ``srun --pty``), so online mode first looks for credentials with ``prompt=False``.
``init_timeout`` bounds the server handshake and ``finish_timeout`` the final upload.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import wandb

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")

_online_failed = False
"""Set when online init failed in this process, so the next job does not wait for it again."""


class WandbSink:
    """One W&B run: per-step metrics at our global step, the final numbers in the run summary."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._broken = False
        self._closed = False

    @property
    def mode(self) -> str:
        return "offline" if self.run.offline else "online"

    def _guard(self, action: Callable[[], None], what: str) -> None:
        """Run a W&B call; the first failure disables the sink, because training matters more."""
        if self._broken or self._closed:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - any W&B failure must leave training running
            self._broken = True
            log.warning(
                "W&B %s failed (%s: %s); W&B logging is off for the rest of this run. "
                "metrics.jsonl and results.json still hold everything.", what, type(err).__name__, err,
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard(lambda: self.run.log(dict(metrics), step=step), "log")

    def log_histograms(self, tensors: Mapping[str, Any], step: int) -> None:
        """Weight and gradient distributions (diagnostics level ``full``) as W&B histogram panels."""
        self._guard(
            lambda: self.run.log({k: wandb.Histogram(v.numpy(), num_bins=64) for k, v in tensors.items()}, step=step),
            "histogram log",
        )

    def summary(self, results: Mapping[str, Any]) -> None:
        """Make the run's summary the final numbers (not the last logged step's), flattened for W&B's table."""
        self._guard(lambda: self.run.summary.update(flatten(results)), "summary")

    def close(self, exit_code: int = 0) -> None:
        """Finish the run (also after a failed call: what was logged gets written); later calls do nothing."""
        self._broken = False
        self._guard(lambda: self.run.finish(exit_code=exit_code), "finish")
        self._closed = True


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"coco": {"AP50": x}}`` -> ``{"coco/AP50": x}``: W&B's run table shows flat keys as columns.

    Non-finite floats become None: W&B stores NaN, but a diverged run's summary should read as
    missing, exactly as in ``results.json``.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, float) and not math.isfinite(value):
            flat[name] = None
        else:
            flat[name] = value
    return flat


def _settings(wandb_cfg: Mapping[str, Any]) -> wandb.Settings:
    timeout = float(wandb_cfg.get("init_timeout", 30))
    return wandb.Settings(init_timeout=timeout, finish_timeout=max(timeout, 60.0), quiet=True)


def _init(mode: str, wandb_cfg: Mapping[str, Any], run_config: dict, name: str, group: str | None, run_dir: Path) -> Any:
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        raise wandb.errors.UsageError("no API key found (WANDB_API_KEY, ~/.netrc)")
    run = wandb.init(
        mode=mode,
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        group=group,
        tags=list(wandb_cfg.get("tags") or []),
        name=name,
        config=run_config,
        dir=str(run_dir),
        reinit="finish_previous",
        settings=_settings(wandb_cfg),
    )
    log.info("W&B %s run %s (%s) in %s", mode, run.id, name, run.dir)
    return run


def build_wandb_sink(
    wandb_cfg: Mapping[str, Any], run_config: dict, name: str, group: str | None, run_dir: Path
) -> WandbSink | None:
    """A sink for the run in ``run_dir`` (W&B files go to ``run_dir/wandb``), or None for no W&B.

    ``wandb_cfg`` is the config's ``wandb`` node; its ``group`` wins over ``group`` (the sweep).
    """
    global _online_failed
    mode = str(wandb_cfg.get("mode", "offline"))
    if mode not in MODES:
        raise ValueError(f"wandb.mode={mode} is not one of {', '.join(MODES)}")
    if mode == "disabled":
        return None
    group = wandb_cfg.get("group") or group
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "online" and _online_failed:
        log.info("W&B online failed earlier in this process; logging %s offline", name)
        mode = "offline"
    if mode == "online":
        try:
            return WandbSink(_init("online", wandb_cfg, run_config, name, group, run_dir))
        except Exception as err:  # noqa: BLE001 - see the module docstring
            _online_failed = True
            log.warning(
                "W&B online could not start (%s: %s). Logging offline instead; upload later with "
                "`wandb sync %s/wandb/offline-run-*`. To log online, set WANDB_API_KEY (or run "
                "`wandb login`) and check that the server (WANDB_BASE_URL, default api.wandb.ai) is "
                "reachable within wandb.init_timeout=%s s; wandb.mode=offline skips this attempt.",
                type(err).__name__, err, run_dir, wandb_cfg.get("init_timeout"),
            )
            mode = "offline"
    try:
        return WandbSink(_init(mode, wandb_cfg, run_config, name, group, run_dir))
    except Exception as err:  # noqa: BLE001 - see the module docstring
        log.warning(
            "W&B offline could not start (%s: %s); this run goes on without W&B "
            "(metrics.jsonl and results.json hold everything). wandb.mode=disabled silences this.",
            type(err).__name__, err,
        )
        return None
