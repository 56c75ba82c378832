"""A run's final numbers: ``results.json`` for programs, ``results_batch_<B>.txt`` for people."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbn_detect.engine import io

RESULTS_FILE = "results.json"


def loss_variance(losses: Sequence[float]) -> float:
    """Population variance of per-iteration training losses: the last completed epoch's for
    ``loss_variance``, the last ``train.loss_window`` iterations' for ``loss_variance_window``.

    NaN when there are fewer than two iterations or a loss was non-finite: a number there would be
    the "0.0" that hid the original study's bugs.
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.size < 2 or not np.all(np.isfinite(values)):
        return math.nan
    return float(values.var())


def results_text(results: dict[str, Any]) -> str:
    """The original study's ``results_batch_<B>.txt``, with the settings that produced the numbers."""

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"model: {results['model']}",
        f"norm: {results['norm']}",
        f"batch per process: {results['batch']}  world size: {results['world_size']}  "
        f"total batch: {results['total_batch']}",
        f"seed: {results['seed']}",
        f"status: {results['status']}",
    ]
    if results.get("error"):
        lines.append(f"error: {results['error']}")
    for key in ("map_voc07", "map_area", "loss_variance", "final_loss", "train_time_s", "epochs", "steps"):
        if key in results:
            lines.append(f"{key}: {fmt(results[key])}")
    if "coco" in results:
        lines.append("coco: " + "  ".join(f"{k} {fmt(v)}" for k, v in results["coco"].items()))
    if "fps" in results:
        fps = results["fps"]
        lines.append(
            f"fps (batch 1, {fps['device']}, {fps['dtype']}): model {fps['fps_model']:.1f}  "
            f"end-to-end {fps['fps_end_to_end']:.1f}"
        )
    if "ap_per_class" in results:
        lines.append(f"AP per class ({results.get('ap_metric', 'voc07')}):")
        for name, ap in results["ap_per_class"].items():
            lines.append(f"  {name:<14} {'no positives' if ap is None else f'{ap:.4f}'}")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    io.write_json(run_dir / RESULTS_FILE, results)
    io.write_text(run_dir / f"results_batch_{results['batch']}.txt", results_text(results))
