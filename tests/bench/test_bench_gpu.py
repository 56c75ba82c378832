"""``python -m cbn_detect.bench gpu``: every GPU timing in one process, one JSON and one markdown table.
Run here as ``--device cpu --tiny``: every row present and measured, each row's timings named
records; a failing row does not stop the others. (The numerical checks are tests/gpu.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbn_detect.bench import gpu
from cbn_detect.bench.__main__ import main
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read(out: Path) -> tuple[dict, str]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON: not strict")

    return json.loads((out / gpu.JSON_NAME).read_text(), parse_constant=refuse), (out / gpu.MARKDOWN_NAME).read_text()


def test_tiny_cpu_run_measures_every_row(tmp_path: Path, capsys) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["gpu", "--device", "cpu", "--tiny", "--out", str(out), "--work", str(work)]) == 0
    report, md = read(out)
    assert [r["name"] for r in report["rows"]] == [r.name for r in gpu.ROWS]
    assert report["tiny"] is True and report["device"] == "cpu"
    for row in report["rows"]:
        assert row["status"] == "measured", row
        assert row["time_s"] > 0 and row["timings"], row
    assert report["failed"] == 0 and report["skipped"] == 0 and report["measured"] == len(gpu.ROWS)
    timings = {r["name"]: r["timings"] for r in report["rows"]}
    assert timings["bench_norm"][0]["norm"] == "bn"  # the row times bn first, the ratios' reference
    assert all(t["step_ms"] > 0 for t in timings["bench_norm"])
    assert all(t["images_per_s"] > 0 for t in timings["bench_train"])
    assert [t["path"] for t in timings["bench_infer"]] == ["torchvision", "fast"]
    summaries = {r["name"]: r["summary"] for r in report["rows"]}
    matched = re.search(r"detections matched (\d+)/(\d+)$", summaries["bench_infer"])
    assert matched and matched[1] == matched[2] and int(matched[2]) > 0, summaries["bench_infer"]
    for family in ("ssd", "retinanet"):
        for norm in ("bn", "cbn"):
            (run,) = timings[f"train_{family}_{norm}"]
            assert (run["model"], run["norm"]) == (gpu.TINY_PLAN.models[family], norm)
            assert run["status"] == "completed" and run["steps"] > 0 and run["nonfinite_steps"] == 0
            assert run["train_time_s"] > 0 and run["sweep_wall_s"] > 0
            assert (work / "runs" / family / norm / "results.json").is_file()
    # One markdown row per row, with its status; the benchmark tables below it.
    lines = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert [(r[0][2:], r[1]) for r in lines[1:]] == [(r["name"], r["status"]) for r in report["rows"]]
    assert md.startswith(f"# GPU benchmark: {len(gpu.ROWS)} measured, 0 failed, 0 skipped")
    assert "## bench_infer" in md and "## What each row measures" in md
    assert capsys.readouterr().out.count("[gpu bench]") == len(gpu.ROWS)


def fake(name: str, behaviour: str) -> gpu.Row:
    def measure(ctx: gpu.Context) -> gpu.Measurement:
        if behaviour == "raise":
            raise RuntimeError("boom")
        if behaviour == "not measured":
            raise gpu.NotMeasured("the run did not complete")
        return gpu.Measurement(behaviour, (gpu.InferTiming("fast", 2.0, 500.0, 1.5),))

    return gpu.Row(name, f"a {behaviour} row", measure)


def test_a_failing_row_does_not_stop_the_others(tmp_path: Path, monkeypatch) -> None:
    rows = (fake("first", "raise"), fake("second", "not measured"), fake("third", "measure"))
    monkeypatch.setattr(gpu, "ROWS", rows)
    assert gpu.run(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    report, md = read(tmp_path)
    assert [(r["name"], r["status"]) for r in report["rows"]] == [
        ("first", "failed"),
        ("second", "failed"),
        ("third", "measured"),
    ]
    assert report["rows"][0]["summary"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in report["rows"][0]["error"]
    assert report["rows"][1]["summary"] == "the run did not complete" and report["rows"][1]["error"] is None
    assert report["rows"][2]["timings"] == [
        {"path": "fast", "ms_per_image": 2.0, "fps": 500.0, "ratio_to_torchvision": 1.5}
    ]
    assert "## first: traceback" in md and "## second: traceback" not in md


def test_rows_after_the_budget_are_skipped_and_only_selects(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "ROWS", (fake("a", "measure"), fake("b", "measure")))
    assert gpu.run(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    report, _ = read(tmp_path)
    assert [r["summary"] for r in report["rows"]] == ["skipped: the time budget (--budget-s) ran out"] * 2
    assert gpu.run(["--device", "cpu", "--out", str(tmp_path), "--only", "b"]) == 0
    report, _ = read(tmp_path)
    assert [r["status"] for r in report["rows"]] == ["skipped", "measured"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "nope"])


def test_the_help_is_written_for_a_researcher_with_a_gpu() -> None:
    """``--help`` says what is timed, how long it takes, the one command and where the numerical
    checks went; nothing in it is about one particular machine (wheels to install, folders of a
    remote runner)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cbn_detect.bench", "gpu", "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "    python -m cbn_detect.bench gpu\n" in text and "under 8 minutes" in text
    assert all(f"``{row.name}``" in text for row in gpu.ROWS)
    assert "pytest tests/gpu" in text
    assert not [word for word in ("pip install", "/tmp/", "PYTHONPATH", "--target") if word in text]
