"""End to end: a tiny training run's offline W&B run says exactly what its own files say."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cbn_detect.tracking.wandb_reader import wait_for_run
from cbn_detect.tracking.wandb_sink import flatten
from tests.conftest import REPO, TINY_RUN


def test_offline_run_matches_metrics_jsonl_and_results_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={run_dir}", "wandb.mode=offline", *TINY_RUN],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = wait_for_run(run_dir / "wandb")
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert run.name == "retinanet_tiny-bn-b4-s0" and run.group == "" and run.exit_code == 0
    resolved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    assert {k: v for k, v in run.config.items() if k != "_wandb"} == resolved

    rows = {row["_step"]: row for row in run.history}
    assert sorted(rows) == sorted({r["step"] for r in records}) == list(range(1, results["steps"] + 1))
    for record in records:
        row = rows[record["step"]]
        for key, value in record.items():
            if key != "step":  # metrics.jsonl writes NaN as null, W&B keeps NaN
                expected = math.nan if value is None else value
                assert row[key] == pytest.approx(expected, rel=1e-9, nan_ok=True), (record["step"], key)
    assert "eval/map_voc07" in rows[results["steps"]]

    final = flatten(results)
    for key in ("status", "map_voc07", "map_area", "coco/AP50", "fps/fps_model", "loss_variance", "steps"):
        assert run.summary[key] == pytest.approx(final[key]), key
