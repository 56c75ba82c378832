"""``python -m cbn_detect.bench gpu``: every check in one process, one JSON and one markdown table.
Run here as ``--device cpu --tiny``: every check present, the CUDA-only ones skipped and saying
so, all the others passed; a failing check does not stop the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbn_detect.bench import gpu
from cbn_detect.bench.__main__ import main

from .conftest import REPO


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read(out: Path) -> tuple[dict, str]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON: not strict")

    return json.loads((out / gpu.JSON_NAME).read_text(), parse_constant=refuse), (out / gpu.MARKDOWN_NAME).read_text()


def test_tiny_cpu_run_has_every_check_and_passes_all_but_the_cuda_ones(tmp_path: Path, capsys) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["gpu", "--device", "cpu", "--tiny", "--out", str(out), "--work", str(work)]) == 0
    report, md = read(out)
    assert [c["name"] for c in report["checks"]] == [c.name for c in gpu.CHECKS]
    assert report["tiny"] is True and report["device"] == "cpu"
    cuda_only = {c.name for c in gpu.CHECKS if c.cuda_only}
    assert cuda_only == {"cbn_fused_fp32", "cbn_fused_bf16"}
    for check in report["checks"]:
        if check["name"] in cuda_only:
            assert check["status"] == "skipped" and check["summary"] == "skipped: needs CUDA", check
        else:
            assert check["status"] == "passed", check
            assert check["time_s"] > 0 and check["numbers"], check
    assert report["failed"] == 0 and report["skipped"] == len(cuda_only)
    numbers = {c["name"]: c["numbers"] for c in report["checks"]}
    assert numbers["native_syncbn"]["layers"] > 0
    assert set(numbers["amp_fp16"]["norms"]) == set(numbers["amp_bf16"]["norms"]) == set(gpu.NORM_NAMES)
    assert numbers["bench_infer"]["matched"] == numbers["bench_infer"]["total"] > 0
    for family in ("ssd", "retinanet"):
        for norm in ("bn", "cbn"):
            run = numbers[f"train_{family}_{norm}"]
            assert run["status"] == "completed" and run["steps"] > 0 and run["nonfinite_steps"] == 0
            assert (work / "runs" / family / norm / "results.json").is_file()
    # One markdown row per check, with its status; the benchmark tables below it.
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert [(r[0][2:], r[1]) for r in rows[1:]] == [(c["name"], c["status"]) for c in report["checks"]]
    assert md.startswith(f"# GPU checks: {len(gpu.CHECKS) - 2} passed, 0 failed, 2 skipped")
    assert "## bench_infer" in md and "(CUDA only)" in md
    assert capsys.readouterr().out.count("[gpu check]") == len(gpu.CHECKS)


def fake(name: str, behaviour: str) -> gpu.Check:
    def run(ctx: gpu.Context) -> dict:
        if behaviour == "raise":
            raise RuntimeError("boom")
        return {"passed": behaviour == "pass", "summary": behaviour, "value": 1.5}

    return gpu.Check(name, f"a {behaviour} check", run)


def test_a_failing_check_does_not_stop_the_others(tmp_path: Path, monkeypatch) -> None:
    checks = (fake("first", "raise"), fake("second", "fail"), fake("third", "pass"))
    monkeypatch.setattr(gpu, "CHECKS", checks)
    assert gpu.run(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    report, md = read(tmp_path)
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("first", "failed"), ("second", "failed"), ("third", "passed")
    ]
    assert report["checks"][0]["summary"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in report["checks"][0]["error"]
    assert report["checks"][2]["numbers"] == {"value": 1.5}
    assert "## first: traceback" in md


def test_checks_after_the_budget_are_skipped_and_only_selects(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "CHECKS", (fake("a", "pass"), fake("b", "pass")))
    assert gpu.run(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    report, _ = read(tmp_path)
    assert [c["summary"] for c in report["checks"]] == ["skipped: the time budget (--budget-s) ran out"] * 2
    assert gpu.run(["--device", "cpu", "--out", str(tmp_path), "--only", "b"]) == 0
    report, _ = read(tmp_path)
    assert [c["status"] for c in report["checks"]] == ["skipped", "passed"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "nope"])


def test_the_help_is_written_for_a_researcher_with_a_gpu() -> None:
    """``--help`` says what is checked, how long it takes and the one command; nothing in it is
    about one particular machine (wheels to install, folders of a remote runner)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cbn_detect.bench", "gpu", "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "    python -m cbn_detect.bench gpu\n" in text and "about 8 minutes" in text
    assert all(f"``{check.name}``" in text for check in gpu.CHECKS)
    assert not [word for word in ("pip install", "/tmp/", "PYTHONPATH", "--target") if word in text]
