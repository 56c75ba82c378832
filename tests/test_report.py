"""The sweep report on a sweep directory written by hand: no training, known numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cbn_detect.report import FIGURES, collect_runs, load_loss_curve, main, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _job(sweep: Path, norm: str, batch: int, seed: int, results: dict | None, losses: list[float]) -> Path:
    """A job directory as Hydra and train.py leave it; ``results=None`` is a job that never finished."""
    job = sweep / "retinanet_tiny" / norm / f"batch_{batch}" / f"seed_{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: retinanet_tiny\nnorm:\n  name: {norm}\ndata:\n  batch: {batch}\nseed: {seed}\n"
    )
    lines = [json.dumps({"step": i + 1, "epoch": 1, "loss": loss}) for i, loss in enumerate(losses)]
    (job / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if results is not None:
        identity = {"model": "retinanet_tiny", "norm": norm, "batch": batch, "world_size": 1, "total_batch": batch, "seed": seed}
        (job / "results.json").write_text(json.dumps({**identity, **results}))
    return job


def _done(map_voc07: float, loss_variance: float, fps: float = 20.0) -> dict:
    return {
        "status": "completed", "map_voc07": map_voc07, "map_area": map_voc07 / 2, "coco": {"AP": 0.1, "AP50": map_voc07 + 0.1},
        "fps": {"fps_model": fps}, "loss_variance": loss_variance, "train_time_s": 100.0,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "2026-11-28" / "07-50-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    _job(sweep, "bn", 2, 0, _done(0.2, 0.04, fps=10.0), [2.0, 1.5, 1.2])
    _job(sweep, "bn", 2, 1, _done(0.4, 0.02, fps=30.0), [2.1, 1.4, 1.1])
    _job(sweep, "bn", 8, 0, _done(0.5, 0.01), [2.0, 1.0])
    _job(sweep, "bn", 8, 1, _done(0.6, 0.01), [2.0, 0.9])
    _job(sweep, "cbn", 2, 0, _done(0.45, 0.03), [2.0, 1.3, 1.0])
    _job(sweep, "cbn", 2, 1, {"status": "failed", "error": "RuntimeError: CUDA out of memory"}, [2.0])
    _job(sweep, "cbn", 8, 0, _done(0.6, 0.01), [2.0, 0.8])
    unfinished = _job(sweep, "cbn", 8, 1, None, [2.0, 1.9])
    with (unfinished / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "lo')  # killed mid-line
    _job(sweep, "gn", 2, 0, {**_done(0.0, math.nan), "status": "diverged"}, [2.0, math.inf])
    return sweep


def _row(table: str, norm: str, batch: int) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:3] == ["retinanet_tiny", norm, str(batch)]:
            return cells
    raise AssertionError(f"no row for {norm} batch {batch} in\n{table}")


def test_table_averages_completed_seeds_and_counts_the_others(sweep: Path) -> None:
    table = summary_table(collect_runs(sweep))
    # columns: model norm batch runs | VOC07 mAP, area mAP, COCO AP50, FPS, loss var, train s
    assert _row(table, "bn", 2)[3:] == ["2 completed", "0.3 ± 0.14", "0.15 ± 0.071", "0.4 ± 0.14", "20 ± 14", "0.03 ± 0.014", "100 ± 0"]
    assert _row(table, "bn", 8)[3:5] == ["2 completed", "0.55 ± 0.071"]
    assert _row(table, "cbn", 2)[3:5] == ["1 completed, 1 failed", "0.45"]
    assert _row(table, "cbn", 8)[3:5] == ["1 completed, 1 unfinished", "0.6"]
    assert _row(table, "gn", 2)[3:] == ["1 diverged", "-", "-", "-", "-", "-", "-"]


def test_loss_curve_reader_skips_a_line_cut_short(sweep: Path) -> None:
    steps, losses = load_loss_curve(sweep / "retinanet_tiny" / "cbn" / "batch_8" / "seed_1" / "metrics.jsonl")
    assert (steps, losses) == ([1, 2], [2.0, 1.9])
    assert load_loss_curve(sweep / "nowhere.jsonl") == ([], [])


def test_cli_writes_report_csv_and_figures(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep)]) == 0
    assert "| retinanet_tiny | bn | 2 | 2 completed | 0.3 ± 0.14 |" in capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    for name, _ in FIGURES:
        png = (sweep / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5_000, name
        assert f"]({name})" in report
    assert "`retinanet_tiny/cbn/batch_2/seed_1`: failed (RuntimeError: CUDA out of memory)" in report
    assert "`retinanet_tiny/cbn/batch_8/seed_1`: unfinished" in report
    assert "`retinanet_tiny/gn/batch_2/seed_0`: diverged" in report
    assert (sweep / "results.csv").read_text().count("\n") == 1 + 9
    assert not list(sweep.glob(".*.tmp"))


def test_cli_finds_the_newest_sweep_and_explains_an_empty_one(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    monkeypatch.chdir(tmp_path)  # the default: the newest sweep under ./multirun
    assert main([]) == 0
    assert (sweep / "map_vs_batch.png").exists()
