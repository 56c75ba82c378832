"""End to end: a tiny training run's offline W&B run says exactly what its own files say."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cbn_detect.tracking.wandb_reader import read_offline_run, wait_for_run
from tests.conftest import REPO, TINY_RUN


def test_offline_run_matches_metrics_jsonl_and_results_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={run_dir}", "wandb.mode=offline", *TINY_RUN],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
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

    # The summary is results.json, every number of it, as W&B's flat "outer/inner" columns, plus the
    # last value of each logged metric, W&B's own "_" keys and media (pictures); results.json is read
    # here with json.
    expected = dict(_flat_keys(results))
    assert len(expected) > 25 and {"coco/AP50", "fps/fps_model", "ap_per_class/circle", "loss_variance"} <= set(
        expected
    )
    logged = {key for record in records for key in record if key != "step"}
    internal = {key for key in run.summary if key.startswith("_")}
    media = {key for key, value in run.summary.items() if isinstance(value, dict) and "_type" in value}  # pictures
    assert set(run.summary) == set(expected) | logged | internal | media, set(run.summary) ^ (set(expected) | logged)
    for key, value in expected.items():
        assert run.summary[key] == (value if not isinstance(value, float) else pytest.approx(value, rel=1e-12)), key
    last = {key: record[key] for record in records for key in record if key != "step"}  # in step order
    for key in logged - set(expected):  # NaN, written to metrics.jsonl as null, stays NaN in W&B
        value = math.nan if last[key] is None else last[key]
        assert run.summary[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key


def _flat_keys(tree: dict, prefix: str = ""):
    """(key, value) of every leaf of a JSON object, nested keys joined by "/"."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_keys(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


# 128 px images make a step slow enough for the signal to land inside the run (as test_resilience).
RESUME_RUN = [
    *TINY_RUN,
    "data.source.image_size=128",
    "model.min_size=128",
    "model.max_size=128",
    "train.epochs=4",
    "eval.coco=false",
    "diagnostics.level=off",
    "wandb.mode=offline",
]


def test_a_run_resumed_after_sigterm_continues_the_same_offline_run(tmp_path: Path) -> None:
    """Offline, W&B 0.31 writes the resumed process's part into a second offline-run folder under the
    same id; read back together, the parts hold every step once."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={run_dir}", *RESUME_RUN]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    kept_id = (run_dir / "wandb" / "run_id").read_text().strip()
    first = wait_for_run(run_dir / "wandb")
    interrupted_at = first.history[-1]["_step"]
    assert first.run_id == kept_id and first.exit_code == 128 + signal.SIGTERM and 4 <= interrupted_at < 16

    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "wandb" / "run_id").read_text().strip() == kept_id
    run = wait_for_run(run_dir / "wandb")
    assert len(run.files) == 2 and len({f.parent for f in run.files}) == 2  # one offline-run folder per process
    assert [read_offline_run(f).run_id for f in run.files] == [kept_id, kept_id]
    assert run.part_exit_codes == [128 + signal.SIGTERM, 0] and run.exit_code == 0

    steps = [row["_step"] for row in run.history]
    assert steps == list(range(1, 17))  # every step once, across both parts
    assert read_offline_run(run.files[1]).history[0]["_step"] == interrupted_at + 1
    records = {
        json.loads(line)["step"]: json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    }
    assert sorted(records) == steps
    assert [row["loss"] for row in run.history] == pytest.approx([records[s]["loss"] for s in steps])
    results = json.loads((run_dir / "results.json").read_text())
    assert run.summary["map_voc07"] == pytest.approx(results["map_voc07"]) and run.summary["steps"] == 16
