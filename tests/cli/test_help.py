"""Every ``python -m cbn_detect.*`` entry point answers ``--help`` with exit 0 and says what it does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# entry point -> a phrase of the line that says what it does
ENTRY_POINTS = {
    "cbn_detect.train": "python -m cbn_detect.train: train one-stage detectors (RetinaNet, SSD) from scratch",
    "cbn_detect.evaluate": "Evaluate a trained run's checkpoint again",
    "cbn_detect.report": "Compare the runs of a sweep",
    "cbn_detect.voc_eval": "Score comp4_det_<split>_<class>.txt detection files",
    "cbn_detect.data.check": "Scan a configured dataset for bad files without training",
    "cbn_detect.data.download": "Download PASCAL VOC (the official tar files), verify their MD5",
    "cbn_detect.bench": "Run one benchmark row and print its table",
}


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """Every entry point's --help, run side by side (each starts a Python that imports torch)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}  # argparse: no wrapping inside a phrase
    started = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for module in ENTRY_POINTS
    }
    done = {}
    for module, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[module] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_says_what_the_command_does(helps, module: str) -> None:
    done = helps[module]
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(ENTRY_POINTS[module] in line for line in done.stdout.splitlines()), done.stdout


def test_train_help_lists_groups_keys_and_examples(helps) -> None:
    out = helps["cbn_detect.train"].stdout
    lines = out.splitlines()
    assert lines[0].startswith("python -m cbn_detect.train: ")  # what it does comes first
    assert "norm: bn, brn, cbn, cbn_naive, frozenbn, gn, none, syncbn" in lines  # from $APP_CONFIG_GROUPS
    assert any(line.startswith("model: ") and "retinanet_tiny" in line for line in lines)
    assert any(line.startswith("data.batch ") for line in lines)
    examples = lines[lines.index("== Examples ==") + 1 :]
    assert sum(line.startswith("python -m cbn_detect.train ") for line in examples) >= 3
    assert "$APP_CONFIG_GROUPS" not in out and "${" not in out
