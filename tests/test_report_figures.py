"""The report's figures plot the numbers of its own results.csv: means, standard deviations and
95% t-intervals recomputed here with numpy (t quantiles from a printed table) from the CSV read
with the csv module, and loss curves from metrics.jsonl read with json. The figures are caught
before they are rendered (``_save_png``), so their data - not their PNG size - is checked."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from cbn_detect import report
from tests.test_report import T_0975, _done, _job

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
    caught: dict[str, object] = {}
    save = report._save_png

    def catch(figure, path: Path) -> None:
        caught[Path(path).name] = figure
        save(figure, path)

    monkeypatch.setattr(report, "_save_png", catch)
    assert report.main([str(sweep), "--images", "0"]) == 0
    return sweep, caught


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
    (ax,) = caught["map_vs_batch.png"].axes
    lines = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert sorted(lines) == ["bn", "cbn", "gn"]
    for norm, container in lines.items():
        batches = sorted(b for n, b in expected if n == norm)
        xs, means = container.lines[0].get_data()
        assert list(means) == pytest.approx([expected[(norm, b)].mean() for b in batches], abs=1e-12), norm
        # dodged around each batch on the log-2 axis by less than a factor 2^0.1
        assert all(abs(math.log2(x / b)) < 0.1 for x, b in zip(xs, batches)), norm
        half_widths = [(seg[1][1] - seg[0][1]) / 2 for seg in container.lines[2][0].get_segments()]
        for b, half in zip(batches, half_widths):
            v = expected[(norm, b)]
            want = T_0975[v.size - 1] * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0
            assert half == pytest.approx(want, rel=2e-4, abs=1e-12), (norm, b)
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
        spreads = [(seg[1][1] - seg[0][1]) / 2 for seg in container.errorbar.lines[2][0].get_segments()]
        want_std = [expected[(n, batch)].std(ddof=1) if (n, batch) in expected and expected[(n, batch)].size > 1 else 0.0
                    for n in ("bn", "cbn", "gn")]
        assert spreads == pytest.approx(want_std, abs=1e-12), batch


def test_loss_curve_figure_plots_every_jobs_metrics_jsonl(figures) -> None:
    sweep, caught = figures
    panels = {ax.get_title(): ax for ax in caught["loss_curves.png"].axes}
    assert sorted(panels) == ["retinanet_tiny, batch 2", "retinanet_tiny, batch 8"]
    for batch in (2, 8):
        drawn = sorted(tuple(line.get_ydata()) for line in panels[f"retinanet_tiny, batch {batch}"].get_lines())
        jobs = sorted(sweep.glob(f"retinanet_tiny/*/batch_{batch}/seed_*/metrics.jsonl"))
        want = sorted(tuple(json.loads(line)["loss"] for line in job.read_text().splitlines()) for job in jobs)
        assert len(drawn) == len(jobs) and drawn == want
