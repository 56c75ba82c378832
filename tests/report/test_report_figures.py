"""The report's figures plot the numbers of its own results.csv: means, standard deviations and
95% t-intervals recomputed here with numpy (t quantiles from a printed table) from the CSV read
with the csv module, and loss curves from metrics.jsonl read with json. The figures are caught
before they are rendered (``figures.save_png``), so their data - not their PNG size - is checked."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from cbn_detect.report import figures as drawing
from cbn_detect.report import main
from tests.report.test_report import T_0975, _done, _job

T_0975 = {**T_0975, 3: 3.1824}

# (norm, batch) -> per seed: (mAP, loss variance) of a completed run, or a status dict
GRID = {
    ("bn", 2): [(0.20, 0.040), (0.40, 0.020), (0.33, 0.031)],
    ("bn", 8): [(0.50, 0.010), (0.61, 0.014)],
    ("cbn", 2): [(0.45, 0.030), {"status": "failed", "error": "RuntimeError: out of memory"}],
    ("cbn", 8): [(0.60, 0.012), (0.70, 0.008), (0.66, 0.011), {"status": "diverged", "error": "loss is nan"}],
    ("gn", 2): [{"status": "diverged", "error": "loss is inf"}],
    ("gn", 8): [(0.55, 0.020), (0.52, 0.024)],
}


def _losses(norm: str, batch: int, seed: int) -> list[float]:
    return [2.0 + 0.1 * seed, 1.5 - 0.01 * batch, 1.2 - 0.05 * len(norm)]


@pytest.fixture
def figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for (norm, batch), seeds in GRID.items():
        for seed, outcome in enumerate(seeds):
            results = _done(*outcome) if isinstance(outcome, tuple) else outcome
            _job(sweep, norm, batch, seed, results, _losses(norm, batch, seed))
    return sweep, _report_figures(sweep, monkeypatch)


def _report_figures(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """The figures of ``python -m cbn_detect.report sweep``, caught as they are saved."""
    caught: dict[str, Figure] = {}
    save = drawing.save_png

    def catch(figure: Figure, path: Path) -> None:
        caught[Path(path).name] = figure
        save(figure, path)

    monkeypatch.setattr(drawing, "save_png", catch)
    assert main([str(sweep), "--images", "0"]) == 0
    return caught


def _texts(figure: Figure) -> str:
    """Every text a reader sees on ``figure``: titles, legends, annotations."""
    found = [figure.get_suptitle()]
    for ax in figure.axes:
        found += [ax.get_title(), *(t.get_text() for t in ax.texts)]
        legend = ax.get_legend()
        found += [t.get_text() for t in legend.get_texts()] if legend is not None else []
    return "\n".join(found)


def _completed_from_csv(sweep: Path, column: str) -> dict[tuple[str, int], np.ndarray]:
    with (sweep / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(seeds) for seeds in GRID.values())
    values: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if row["status"] == "completed":
            values.setdefault((row["norm"], int(row["batch"])), []).append(float(row[column]))
    return {key: np.array(v) for key, v in values.items()}


def test_map_figure_plots_the_csvs_means_and_95_percent_t_intervals(figures) -> None:
    sweep, caught = figures
    expected = _completed_from_csv(sweep, "map_voc07")
    assert sorted(expected) == [("bn", 2), ("bn", 8), ("cbn", 2), ("cbn", 8), ("gn", 8)]
    figure = caught["map_vs_batch.png"]
    (ax,) = figure.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert sorted(lines) == ["bn", "cbn", "gn"]
    for norm, line in lines.items():
        batches = sorted(b for n, b in expected if n == norm)
        xs, means = line.get_data()
        assert list(means) == pytest.approx([expected[(norm, b)].mean() for b in batches], abs=1e-12), norm
        # dodged around each batch on the log-2 axis by less than a factor 2^0.1
        assert all(abs(math.log2(x / b)) < 0.1 for x, b in zip(xs, batches)), norm
        # an interval only where there are 2 seeds or more: cbn at batch 2 has 1, and no bar
        several = [b for b in batches if expected[(norm, b)].size > 1]
        if not several:
            assert f"_{norm} 95% CI" not in bars, norm
            continue
        container = bars[f"_{norm} 95% CI"]
        segments = container.lines[2][0].get_segments()
        assert [b for b in batches if any(abs(math.log2(seg[0][0] / b)) < 0.1 for seg in segments)] == several, norm
        assert len(container.lines[1]) == 2 and all(len(cap.get_xdata()) == len(several) for cap in container.lines[1])
        for b, seg in zip(several, segments):
            v = expected[(norm, b)]
            want = T_0975[v.size - 1] * v.std(ddof=1) / math.sqrt(v.size)
            assert (seg[1][1] - seg[0][1]) / 2 == pytest.approx(want, rel=2e-4, abs=1e-12), (norm, b)
    assert "cbn" in lines and expected[("cbn", 2)].size == 1 and "_cbn 95% CI" in bars
    assert len(bars["_cbn 95% CI"].lines[2][0].get_segments()) == 1  # batch 8 only
    title = figure.get_suptitle()
    assert "open marker: a single run (no bar)" in title and "×: no completed run" in title
    # gn at batch 2 has no completed run: a cross on the axis, not a point
    crosses = [c for c in ax.collections if c.get_label() == "gn: no completed run"]
    assert len(crosses) == 1 and crosses[0].get_offsets()[0][1] == 0.0


def test_loss_variance_figure_plots_the_csvs_means_and_standard_deviations(figures) -> None:
    sweep, caught = figures
    expected = _completed_from_csv(sweep, "loss_variance")
    (ax,) = caught["loss_variance.png"].axes
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    assert sorted(bars) == ["batch 2", "batch 8"]
    for batch in (2, 8):
        container = bars[f"batch {batch}"]
        heights = [p.get_height() for p in container.patches]
        want = [expected[(n, batch)].mean() if (n, batch) in expected else 0.0 for n in ("bn", "cbn", "gn")]
        assert heights == pytest.approx(want, abs=1e-12), batch
        # ± std only over 2 seeds or more: at batch 2, cbn has 1 seed and gn none, so only bn has a bar
        (std,) = [
            c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == f"_batch {batch} std"
        ]
        segments = std.lines[2][0].get_segments()
        centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
        several = [
            i for i, n in enumerate(("bn", "cbn", "gn")) if (n, batch) in expected and expected[(n, batch)].size > 1
        ]
        assert [seg[0][0] for seg in segments] == pytest.approx([centres[i] for i in several]), batch
        spreads = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
        want_std = [expected[(n, batch)].std(ddof=1) for i, n in enumerate(("bn", "cbn", "gn")) if i in several]
        assert spreads == pytest.approx(want_std, abs=1e-12), batch
        assert all(len(cap.get_xdata()) == len(several) for cap in std.lines[1]), batch
    assert ax.get_title() == "retinanet_tiny (mean ± std over seeds; 1 seed: no bar; × = no completed run)"


def test_loss_curve_figure_plots_every_jobs_metrics_jsonl(figures) -> None:
    sweep, caught = figures
    panels = {ax.get_title(): ax for ax in caught["loss_curves.png"].axes}
    assert sorted(panels) == ["retinanet_tiny, batch 2", "retinanet_tiny, batch 8"]
    for batch in (2, 8):
        drawn = sorted(tuple(line.get_ydata()) for line in panels[f"retinanet_tiny, batch {batch}"].get_lines())
        jobs = sorted(sweep.glob(f"retinanet_tiny/*/batch_{batch}/seed_*/metrics.jsonl"))
        want = sorted(tuple(json.loads(line)["loss"] for line in job.read_text().splitlines()) for job in jobs)
        assert len(drawn) == len(jobs) and drawn == want


def test_a_report_of_single_runs_draws_no_error_bars_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One seed per grid point, every one completed: no bar (not even a zero-length one with caps),
    the figures say the points are single runs, and nothing speaks of a missing run."""
    sweep = tmp_path / "sweep"
    for (norm, batch), value in {("bn", 2): 0.3, ("bn", 8): 0.5, ("cbn", 2): 0.35, ("cbn", 8): 0.55}.items():
        _job(sweep, norm, batch, 0, _done(value, value / 10), _losses(norm, batch, 0))
    caught = _report_figures(sweep, monkeypatch)
    for name in ("map_vs_batch.png", "loss_variance.png"):
        (ax,) = caught[name].axes
        assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)], name
        assert "no completed run" not in _texts(caught[name]) and "×" not in _texts(caught[name]), name
    assert caught["map_vs_batch.png"].get_suptitle() == "each point is a single run (1 seed): no error bars"
    assert caught["loss_variance.png"].axes[0].get_title() == "retinanet_tiny (single runs: no error bars)"
    (ax,) = caught["map_vs_batch.png"].axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert drawn == {"bn": [0.3, 0.5], "cbn": [0.35, 0.55]}  # the points are there, only the bars are not


def test_the_missing_run_note_appears_only_with_a_missing_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _job(sweep, "bn", 2, seed, _done(0.3 + seed / 10, 0.01), _losses("bn", 2, seed))
        _job(sweep, "gn", 2, seed, _done(0.2 + seed / 10, 0.02), _losses("gn", 2, seed))
    caught = _report_figures(sweep, monkeypatch)
    assert all("no completed run" not in _texts(f) and "×" not in _texts(f) for f in caught.values())
    assert caught["loss_variance.png"].axes[0].get_title() == "retinanet_tiny (mean ± std over seeds)"
    assert caught["map_vs_batch.png"].get_suptitle() == "mean over seeds; bars: 95% t-CI of the mean (n ≥ 2)"

    _job(sweep, "gn", 8, 0, {"status": "failed", "error": "RuntimeError: out of memory"}, [2.0])
    caught = _report_figures(sweep, monkeypatch)
    assert caught["loss_variance.png"].axes[0].get_title().endswith("; × = no completed run)")
    assert caught["map_vs_batch.png"].get_suptitle().endswith(", ×: no completed run")
    (ax,) = caught["loss_variance.png"].axes
    assert [t.get_text() for t in ax.texts] == ["×"]  # at gn, batch 8


STEPS = 10
LOG_EVERY = 4
SCHEDULED = """model:
  name: retinanet_tiny
norm:
  name: {norm}
{burnin}data:
  batch: 2
seed: {seed}
cbn_burnin: 0.25
optim:
  warmup:
    iters: 2
  schedule:
    name: step
    milestones: [0.67, 0.89]
    gamma: 0.1
"""


def _trained_job(sweep: Path, norm: str, seed: int, losses: list[float | None], completed: bool) -> Path:
    """A job as the trainer leaves it: every step's ``step_loss``, a full record every LOG_EVERY steps
    (not at the last step), the evaluation's record; its config as Hydra saves it (interpolations
    kept); results.json with the run's steps when it completed."""
    results = {**_done(0.3, 0.01), "steps": len(losses)} if completed else None
    job = _job(sweep, norm, 2, seed, results, [])
    burnin = "  burnin: ${cbn_burnin}\n" if norm == "cbn" else ""
    (job / ".hydra" / "config.yaml").write_text(SCHEDULED.format(norm=norm, burnin=burnin, seed=seed))
    records = []
    for step, loss in enumerate(losses, start=1):
        record = {"step": step, "step_loss": loss}
        if step % LOG_EVERY == 0:
            record = {"step": step, "epoch": 1, "loss": loss, "step_loss": loss, "lr": 0.01}
        records.append(record)
    records.append({"step": len(losses), "epoch": 1, "eval/map_voc07": 0.3})
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return job


def test_loss_curves_show_every_step_and_mark_the_burn_in_end_and_the_lr_decays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    curves = {
        "bn/batch_2/seed_0": [2.0 - 0.1 * i for i in range(STEPS)],
        "cbn/batch_2/seed_0": [2.1 - 0.1 * i for i in range(STEPS)],
        "cbn/batch_2/seed_1": [2.2, 2.1, 2.0, 1.9, None, 1.7, 1.6],  # a non-finite step, then unfinished at step 7
    }
    for job, losses in curves.items():
        norm, _, seed = job.split("/")
        _trained_job(sweep, norm, int(seed[-1]), losses, completed=len(losses) == STEPS)
    caught = _report_figures(sweep, monkeypatch)
    (ax,) = caught["loss_curves.png"].axes
    drawn = {line.get_gid(): line for line in ax.get_lines()}
    for job, losses in curves.items():
        line = drawn[f"loss:retinanet_tiny/{job}"]
        assert list(line.get_xdata()) == list(range(1, len(losses) + 1)), job  # every step, the last one too
        want = [math.nan if v is None else v for v in losses]
        np.testing.assert_array_equal(line.get_ydata(), want)  # the non-finite step is a gap (NaN)
        assert line.get_linestyle() == ("-" if len(losses) == STEPS else "--"), job
    # by hand: CBN's burn-in int(0.25 x 10) = 2 steps of plain BN; step decays at round(6.7), round(8.9)
    burnin = [line for line in ax.get_lines() if line.get_gid() == "burnin:cbn"]
    decays = [line for line in ax.get_lines() if line.get_gid() == "lr_decay"]
    assert [list(line.get_xdata()) for line in burnin] == [[2, 2]]  # once: the unfinished run adds no mark
    assert sorted(line.get_xdata()[0] for line in decays) == [7, 9]
    assert not [line for line in ax.get_lines() if line.get_gid() == "burnin:bn"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "cbn: burn-in ends (step 2)" in legend and "lr decay (step 7, 9)" in legend
