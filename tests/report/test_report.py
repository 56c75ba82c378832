"""The sweep report on sweep directories written by hand: no training, known numbers.

Expected statistics are computed here with numpy from the numbers written into the sweep, and
t quantiles are copied from a printed table, never taken from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from cbn_detect.report import collect_runs, figures, main
from cbn_detect.report.collect import JobResult, load_loss_curve
from cbn_detect.report.figures import FIGURES
from cbn_detect.report.tables import paired_section, summary_table
from tests.conftest import REPO, TINY_RUN

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T_0975 = {1: 12.7062, 2: 4.3027}  # Student-t 97.5% quantiles by degrees of freedom, from a printed table


def _job(
    sweep: Path, norm: str, batch: int, seed: int, results: dict | None, losses: list[float], world_size: int = 1
) -> Path:
    """A job directory as Hydra and train.py leave it; ``results=None`` is a job that never finished."""
    job = sweep / "retinanet_tiny" / norm / f"batch_{batch}" / f"seed_{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: retinanet_tiny\nnorm:\n  name: {norm}\ndata:\n  batch: {batch}\nseed: {seed}\n"
    )
    lines = [json.dumps({"step": i + 1, "epoch": 1, "loss": loss}) for i, loss in enumerate(losses)]
    (job / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if results is not None:
        identity = {
            "model": "retinanet_tiny",
            "norm": norm,
            "batch": batch,
            "world_size": world_size,
            "total_batch": batch * world_size,
            "seed": seed,
        }
        (job / "results.json").write_text(json.dumps({**identity, **results}))
    return job


def _done(map_voc07: float, loss_variance: float, fps: float = 20.0) -> dict:
    return {
        "status": "completed",
        "map_voc07": map_voc07,
        "map_area": map_voc07 / 2,
        "coco": {"AP": 0.1, "AP50": map_voc07 + 0.1},
        "fps": {"fps_model": fps},
        "loss_variance": loss_variance,
        "train_time_s": 100.0,
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
    """The cells of the first table line for (norm, batch)."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:3] == ["retinanet_tiny", norm, str(batch)]:
            return cells
    raise AssertionError(f"no row for {norm} batch {batch} in\n{table}")


def test_table_averages_completed_seeds_and_counts_the_others(sweep: Path) -> None:
    table = summary_table(collect_runs(sweep))
    # columns: model norm batch procs "total batch" n runs | VOC07 mAP, area mAP, COCO AP50, FPS, loss var, train s
    assert _row(table, "bn", 2)[3:] == [
        "1",
        "2",
        "2",
        "2 completed",
        "0.3 ± 0.14",
        "0.15 ± 0.071",
        "0.4 ± 0.14",
        "20 ± 14",
        "0.03 ± 0.014",
        "100 ± 0",
    ]
    assert _row(table, "bn", 8)[3:8] == ["1", "8", "2", "2 completed", "0.55 ± 0.071"]
    assert _row(table, "cbn", 2)[5:8] == ["1", "1 completed, 1 failed", "0.45"]
    assert _row(table, "cbn", 8)[5:8] == ["1", "1 completed, 1 unfinished", "0.6"]
    assert _row(table, "gn", 2)[3:] == ["1", "2", "0", "1 diverged", "-", "-", "-", "-", "-", "-"]


def test_loss_curve_reader_skips_a_line_cut_short(sweep: Path) -> None:
    steps, losses = load_loss_curve(sweep / "retinanet_tiny" / "cbn" / "batch_8" / "seed_1" / "metrics.jsonl")
    assert (steps, losses) == ([1, 2], [2.0, 1.9])
    assert load_loss_curve(sweep / "nowhere.jsonl") == ([], [])


def test_cli_writes_report_csv_and_figures(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep)]) == 0
    assert "| retinanet_tiny | bn | 2 | 1 | 2 | 2 | 2 completed | 0.3 ± 0.14 |" in capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    for name, _ in FIGURES:
        png = (sweep / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5_000, name
        assert f"]({name})" in report
    assert "`retinanet_tiny/cbn/batch_2/seed_1`: failed (RuntimeError: CUDA out of memory)" in report
    assert "`retinanet_tiny/cbn/batch_8/seed_1`: unfinished" in report
    assert "`retinanet_tiny/gn/batch_2/seed_0`: diverged" in report
    assert "FPS timings disturbed" not in report  # no job recorded an inconsistent timing
    assert (sweep / "results.csv").read_text().count("\n") == 1 + 9
    assert not list(sweep.glob(".*.tmp"))


def test_jobs_whose_fps_timing_was_disturbed_are_listed_and_the_others_not(sweep: Path) -> None:
    disturbed = _done(0.3, 0.02)
    disturbed["fps"] = {"fps_model": 3.4, "fps_end_to_end": 47.3, "consistent": False}
    _job(sweep, "gn", 8, 0, disturbed, [2.0, 1.0])
    steady = _done(0.3, 0.02)
    steady["fps"] = {"fps_model": 40.0, "fps_end_to_end": 30.0, "consistent": True}
    _job(sweep, "gn", 8, 1, steady, [2.0, 1.0])
    assert main([str(sweep)]) == 0
    section = (sweep / "report.md").read_text().split("## FPS timings disturbed")[1].split("##")[0]
    assert "- `retinanet_tiny/gn/batch_8/seed_0`" in section and "seed_1" not in section
    assert "python -m cbn_detect.evaluate" in section


def test_jobs_without_detection_files_get_no_picture_and_no_warning(
    sweep: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pictures need a job's devkit files (``detections/``) and dataset; these hand-written jobs have
    neither, so the report has no Detections section and says nothing about it."""
    assert main([str(sweep)]) == 0
    assert "## Detections" not in (sweep / "report.md").read_text()
    assert not list(sweep.glob("detections_*.png"))
    assert not [r for r in caplog.records if "detection picture" in r.getMessage()]


def test_cli_finds_the_newest_sweep_and_explains_an_empty_one(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    monkeypatch.chdir(tmp_path)  # the default: the newest sweep under ./multirun
    assert main([]) == 0
    assert (sweep / "map_vs_batch.png").exists()


# The study's grid on 2 processes: 3 seeds of bn/syncbn/cbn/gn at 2 and 8 images per process.
# None: the seed did not complete (see STUDY_FAILURES); syncbn at batch 2 is skipped as a whole.
STUDY_MAP = {
    ("bn", 2): [0.30, 0.34, 0.29],
    ("bn", 8): [0.50, 0.55, 0.52],
    ("syncbn", 2): [None, None, None],
    ("syncbn", 8): [0.51, 0.54, 0.53],
    ("cbn", 2): [0.36, None, 0.33],
    ("cbn", 8): [0.52, 0.56, 0.50],
    ("gn", 2): [0.33, 0.35, 0.30],
    ("gn", 8): [0.45, None, None],
}
SKIP_REASON = "syncbn at 2 images per process: the lead's reason"
STUDY_FAILURES = {
    ("syncbn", 2, 0): {"status": "skipped", "reason": SKIP_REASON},
    ("syncbn", 2, 1): {"status": "skipped", "reason": SKIP_REASON},
    ("syncbn", 2, 2): {"status": "skipped", "error": "skipped without a reason field"},
    ("cbn", 2, 1): {"status": "failed", "error": "RuntimeError: CUDA out of memory"},
    ("gn", 8, 1): {"status": "diverged", "error": "loss is nan", "map_voc07": math.nan},
    ("gn", 8, 2): {"status": "diverged", "error": "loss is inf"},
}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    sweep = tmp_path / "study"
    sweep.mkdir()
    for (norm, batch), maps in STUDY_MAP.items():
        for seed, value in enumerate(maps):
            results = _done(value, 0.01) if value is not None else STUDY_FAILURES[(norm, batch, seed)]
            _job(sweep, norm, batch, seed, results, [2.0, 1.5 - 0.1 * seed, 1.2], world_size=2)
    return sweep


def _sections(printed: str) -> tuple[str, str]:
    """(summary table, paired-difference section) of the CLI's output, in that order."""
    summary, heading, paired = printed.partition("## Paired difference to BN (VOC07 mAP)")
    assert heading, printed
    return summary, paired


def _expected_pairs(norm: str, batch: int) -> np.ndarray:
    """norm - bn per seed where both completed, computed here independently of the report."""
    treated, base = STUDY_MAP[(norm, batch)], STUDY_MAP[("bn", batch)]
    return np.array([t - b for t, b in zip(treated, base) if t is not None and b is not None])


def test_study_summary_gives_processes_n_and_mean_std(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(study)]) == 0
    summary, _ = _sections(capsys.readouterr().out)
    for (norm, batch), maps in STUDY_MAP.items():
        done = np.array([v for v in maps if v is not None])
        procs, total, n, runs, voc07 = _row(summary, norm, batch)[3:8]
        assert (procs, total, n) == ("2", str(2 * batch), str(done.size)), (norm, batch)
        if done.size == 0:
            assert voc07 == "-"
        elif done.size == 1:
            assert float(voc07) == pytest.approx(done[0])
        else:
            mean, std = (float(x) for x in voc07.split(" ± "))
            assert mean == pytest.approx(done.mean(), abs=5e-4)
            assert std == pytest.approx(done.std(ddof=1), rel=0.05)
    assert _row(summary, "syncbn", 2)[6] == "3 skipped"
    assert _row(summary, "cbn", 2)[6] == "2 completed, 1 failed"
    assert _row(summary, "gn", 8)[6] == "1 completed, 2 diverged"


def test_study_paired_difference_to_bn_matches_numpy(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(study)]) == 0
    _, paired = _sections(capsys.readouterr().out)
    assert "Student-t interval" in paired and "paired by seed" in paired
    checked = 0
    for norm, batch in STUDY_MAP:
        if norm == "bn":
            with pytest.raises(AssertionError):
                _row(paired, norm, batch)
            continue
        diffs = _expected_pairs(norm, batch)
        procs, pairs, mean, interval = _row(paired, norm, batch)[3:7]
        assert pairs == str(diffs.size), (norm, batch)
        if diffs.size == 0:
            assert (procs, mean, interval) == ("-", "-", "-")
            continue
        assert procs == "2"
        assert float(mean) == pytest.approx(diffs.mean(), abs=5.1e-5)
        if diffs.size < 2:
            assert interval == "-"
            continue
        half = T_0975[diffs.size - 1] * diffs.std(ddof=1) / math.sqrt(diffs.size)
        low, high = (float(x) for x in interval.strip("[]").split(","))
        assert (low, high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-4)
        checked += 1
    assert checked == 4  # syncbn 8, cbn 2 (seed 1 unpaired), cbn 8, gn 2
    assert _expected_pairs("cbn", 2).size == 2 and _expected_pairs("gn", 8).size == 1


def test_study_report_lists_skipped_jobs_with_their_reason(study: Path) -> None:
    assert main([str(study)]) == 0
    report = (study / "report.md").read_text()
    assert f"`retinanet_tiny/syncbn/batch_2/seed_0`: skipped ({SKIP_REASON})" in report
    assert "`retinanet_tiny/syncbn/batch_2/seed_2`: skipped (skipped without a reason field)" in report
    assert "`retinanet_tiny/cbn/batch_2/seed_1`: failed (RuntimeError: CUDA out of memory)" in report
    headings = ("## Summary", "## Paired difference", "## Jobs that did not complete")
    assert [report.index(h) for h in headings] == sorted(report.index(h) for h in headings)
    assert "| retinanet_tiny | syncbn | 2 | - | 0 | - | - |" in report
    csv_lines = (study / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 24
    assert "total_batch" in csv_lines[0].split(",") and "reason" in csv_lines[0].split(",")


def test_study_figures_are_drawn_with_a_skipped_cell(study: Path) -> None:
    assert main([str(study)]) == 0
    for name, _ in FIGURES:
        pixels = mpimg.imread(study / name)
        height, width = pixels.shape[:2]
        assert height > 200 and width > 300, name
        rgb = pixels[..., :3].reshape(-1, 3)
        assert len(np.unique(np.round(rgb, 2), axis=0)) > 20, name  # more than a blank canvas and some text
        assert (rgb < 0.5).any() and (rgb > 0.9).any(), name


def test_cli_as_a_module_prints_the_summary_then_the_paired_table(study: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "cbn_detect.report", str(study)], capture_output=True, text=True, env=env, check=True
    )
    summary, paired = _sections(done.stdout)
    assert summary.lstrip().startswith("| model | norm | batch | procs | total batch | n | runs | VOC07 mAP |")
    assert "| model | norm | batch | procs | pairs | Δ VOC07 mAP vs bn | 95% CI |" in paired
    assert _row(paired, "cbn", 2)[4] == "2"


def _completed_row(norm: str, seed: int, world_size: int, map_voc07: float) -> JobResult:
    return JobResult(
        f"{norm}/ws{world_size}/seed_{seed}",
        "completed",
        model="retinanet_tiny",
        norm=norm,
        batch=2,
        seed=seed,
        world_size=world_size,
        total_batch=2 * world_size,
        map_voc07=map_voc07,
    )


def test_runs_pair_only_at_the_same_world_size(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        _completed_row("bn", 0, 1, 0.30),
        _completed_row("bn", 1, 2, 0.40),
        _completed_row("cbn", 0, 2, 0.50),
        _completed_row("cbn", 1, 2, 0.45),
    ]
    assert _row(summary_table(rows), "bn", 2)[3:6] == ["1, 2", "2, 4", "2"]
    assert "mixes world sizes [1, 2]" in caplog.text
    # seed 0 ran bn on 1 process and cbn on 2: not a pair; seed 1 is the only one.
    assert _row(paired_section(rows), "cbn", 2)[3:7] == ["2", "1", "+0.0500", "-"]


def test_paired_section_says_why_it_is_empty_without_bn() -> None:
    section = paired_section([_completed_row("cbn", 0, 1, 0.5)])
    assert section.startswith("## Paired difference to BN") and "Nothing to pair" in section


def test_every_column_is_a_results_field_or_lifted_out_of_one():
    from cbn_detect.report.collect import NESTED_COLUMNS
    from cbn_detect.report.tables import COLUMNS, CSV_FIELDS
    from cbn_detect.results import FIELDS

    assert all(key in FIELDS or key in NESTED_COLUMNS for key, _ in COLUMNS)
    assert all(field in FIELDS for field, _ in NESTED_COLUMNS.values())
    row_fields = {f.name for f in dataclasses.fields(JobResult)}
    assert set(CSV_FIELDS) <= row_fields
    assert all(name in FIELDS or name in NESTED_COLUMNS for name in row_fields - {"job_dir"})


# --- a real run: every step's loss, the same after a resume, drawn with the schedule's marks ---

# CBN with a full metrics record every 3 steps (not at the last one): 16 images at batch 4 over 2
# epochs = 8 steps. cbn_burnin=0.3 keeps the config's ${cbn_burnin} interpolation, a fraction.
CURVE_RUN = [
    *TINY_RUN,
    "norm=cbn",
    "cbn_burnin=0.3",
    "train.log_every=3",
    "eval.coco=false",
    "eval.fps_images=1",
    "diagnostics.level=off",
    "wandb.mode=disabled",
]
CURVE_STEPS = 8


def _curve_run(run_dir: Path) -> subprocess.Popen:
    """``python -m cbn_detect.train`` into ``run_dir``, in a session of its own (a signal reaches it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={run_dir}", *CURVE_RUN],
        cwd=run_dir.parent,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finished(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        output = proc.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, output


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A folder of two runs of CURVE_RUN: ``straight``, and ``resumed``, stopped by SIGTERM once step
    4 is logged (it checkpoints inside the second epoch) and run again; with the resumed run's output."""
    runs = tmp_path_factory.mktemp("curves") / "runs"
    runs.mkdir()
    code, output = _finished(_curve_run(runs / "straight"))
    assert code == 0, output[-3000:]
    proc = _curve_run(runs / "resumed")
    deadline = time.monotonic() + 300
    while not any(r.get("step") == 4 for r in _records(runs / "resumed")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the signal: " + proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    code, stopped = _finished(proc)
    assert code == 128 + signal.SIGTERM, stopped[-3000:]
    code, output = _finished(_curve_run(runs / "resumed"))
    assert code == 0, output[-3000:]
    resumed_at = int(output.split("resuming after step ")[1].split()[0].rstrip(")"))
    assert 4 <= resumed_at < CURVE_STEPS, output[-3000:]
    return runs, output


def test_every_steps_loss_is_logged_once_and_a_resume_gives_the_uninterrupted_ones(trained: tuple[Path, str]) -> None:
    runs, _ = trained
    straight, resumed = _records(runs / "straight"), _records(runs / "resumed")
    for records in (straight, resumed):
        assert [r["step"] for r in records if "step_loss" in r] == list(range(1, CURVE_STEPS + 1))  # once each
        assert [r["step"] for r in records if "loss" in r] == [3, 6]  # the full records: train.log_every=3
    per_step = [[r["step_loss"] for r in records if "step_loss" in r] for records in (straight, resumed)]
    assert per_step[1] == per_step[0]  # bit for bit
    steps, losses = load_loss_curve(runs / "resumed" / "metrics.jsonl")
    assert steps == list(range(1, CURVE_STEPS + 1)) and all(math.isfinite(v) for v in losses)
    assert (steps, losses) == load_loss_curve(runs / "straight" / "metrics.jsonl")


def test_the_report_entrypoint_draws_every_step_and_the_schedule_of_real_runs(
    trained: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, _ = trained
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "cbn_detect.report", str(runs), "--images", "0"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| retinanet_tiny | cbn | 4 | 1 | 4 | 2 | 2 completed |" in done.stdout
    for name, _ in FIGURES:
        assert (runs / name).read_bytes().startswith(PNG_SIGNATURE), name
    # the loss-curve figure of the same folder, caught before it is saved, holds what the PNG shows
    caught = {}
    monkeypatch.setattr(figures, "save_png", lambda figure, path: caught.setdefault(Path(path).name, figure))
    figures.write_figures(collect_runs(runs), runs)
    (ax,) = caught["loss_curves.png"].axes
    curves = {line.get_gid(): list(line.get_xdata()) for line in ax.get_lines() if line.get_gid().startswith("loss:")}
    assert curves == {"loss:straight": list(range(1, 9)), "loss:resumed": list(range(1, 9))}
    # by hand: int(0.3 x 8) = 2 burn-in steps; the lr decays at round(0.67 x 8) = 5 and round(0.89 x 8) = 7
    assert [list(line.get_xdata()) for line in ax.get_lines() if line.get_gid() == "burnin:cbn"] == [[2, 2]]
    assert sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "lr_decay") == [5, 7]
