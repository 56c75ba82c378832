"""Short training runs on a CUDA device complete and stay finite: the runs ``python -m cbn_detect.bench
gpu`` times (300 iterations of ``ssd300`` at 300 px and ``retinanet_r50`` at 512 px, batch 4, BN and
CBN with burn-in a quarter of the run, synthetic data), through the real entry point with its final
evaluation. A few minutes per model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbn_detect.bench.gpu import GPU_PLAN, TRAIN_NORMS, training_overrides
from cbn_detect.results import read_results
from tests.conftest import REPO
from tests.helpers.run_if import RunIf


@pytest.mark.slow
@RunIf(cuda=True)
@pytest.mark.parametrize("family", ["ssd", "retinanet"])
def test_short_training_runs_complete_without_a_nonfinite_step(family: str, tmp_path: Path) -> None:
    sweep = tmp_path / "runs"
    overrides = training_overrides(GPU_PLAN, family, TRAIN_NORMS, "cuda", tmp_path / "data", sweep)
    done = subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", "-m", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=900,
        check=False,
    )
    tail = (done.stdout + done.stderr)[-3000:]
    for norm in TRAIN_NORMS:
        results = read_results(sweep / norm)
        assert results is not None and results.status == "completed", (norm, results and results.error, tail)
        assert results.steps > 0 and results.nonfinite_steps == 0, (norm, results.steps, results.nonfinite_steps)
        assert results.final_loss is not None and math.isfinite(results.final_loss), (norm, results.final_loss)
