"""A misspelt key or group option never trains: ``python -m cbn_detect.train`` refuses it before
anything runs, in one line on stderr naming the nearest valid one, with exit code 2 and no run
folder; valid commands (sweeps, experiments, ``++key``, ``--cfg job``, ``-cd``) still reach Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbn_detect.overrides import find_problem, nearest_key, no_such_option
from tests.conftest import REPO

QUIET = ["wandb.mode=disabled"]
NORMS = "(bn, brn, cbn, cbn_naive, frozenbn, gn, none, syncbn)"

COMMANDS = {
    "sweep typo": ["-m", "data.bach=4", "hydra.sweep.dir={tmp}/sweep", *QUIET],
    "plus typo": ["+data.bach=4", "hydra.run.dir={tmp}/run", *QUIET],
    "option typo": ["norm=bnn", "hydra.run.dir={tmp}/run", *QUIET],
    "cfg job": ["norm=cbn", "norm.window=2", "--cfg", "job"],
    # processes=0 stops the first job in main() (exit 2, "processes=0 must be at least 1"): the
    # whole sweep got through the check and Hydra launched it, and nothing trains
    "valid sweep": ["-m", "norm=bn,cbn", "data.batch=4,8", "processes=0", "hydra.sweep.dir={tmp}/sweep", *QUIET],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command of :data:`COMMANDS` through the real entry point, side by side (each starts a
    Python that imports torch), each in its own folder, which is also its working directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = {}
    for name, args in COMMANDS.items():
        folder = tmp_path_factory.mktemp(name.replace(" ", "_"))
        argv = [sys.executable, "-m", "cbn_detect.train", *(a.format(tmp=folder) for a in args)]
        process = subprocess.Popen(argv, cwd=folder, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started[name] = (process, folder)
    done = {}
    for name, (process, folder) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), folder)
    return done


def _refused(runs: dict, name: str, line: str) -> None:
    proc, folder = runs[name]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"cbn_detect.train: {line}"]
    assert list(folder.iterdir()) == [], "nothing may be written before the refusal"


def test_a_misspelt_key_is_refused_in_one_line_before_a_sweep_starts(runs) -> None:
    _refused(runs, "sweep typo", "data.bach: no such key; did you mean data.batch?")


def test_a_misspelt_key_given_with_plus_is_refused_too(runs) -> None:
    _refused(runs, "plus typo", "+data.bach: no such key; did you mean data.batch?")


def test_a_misspelt_group_option_is_refused_with_the_options(runs) -> None:
    _refused(runs, "option typo", f"norm=bnn: no such option; did you mean norm=bn? {NORMS}")


def test_cfg_job_prints_a_valid_config(runs) -> None:
    proc, _ = runs["cfg job"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  name: cbn\n  window: 2\n" in proc.stdout


def test_a_valid_sweep_passes_the_check_and_reaches_its_jobs(runs) -> None:
    proc, folder = runs["valid sweep"]
    output = proc.stdout + proc.stderr
    assert "Launching 4 jobs locally" in output, output[-2000:]
    assert "processes=0 must be at least 1" in output  # the first job's main(): the check let it through
    assert "no such" not in output
    assert not list(folder.rglob("results.json"))


# --- the check in-process, on Hydra's real compositions (no subprocess: a fraction of a second each)


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["model=retinanet_tny"],
            "model=retinanet_tny: no such option; did you mean model=retinanet_tiny? "
            "(retinanet_r18, retinanet_r50, retinanet_tiny, ssd300, ssd300_r50, ssd512, ssd_tiny)",
        ),
        (["-m", "norm=bn,bnn"], f"norm=bnn: no such option; did you mean norm=bn? {NORMS}"),
        (["norm=bn", "norm.window=2"], "norm.window: no such key for norm=bn; norm=cbn and norm=cbn_naive have it"),
        (
            ["data=voc07", "data.source.num_train=3"],
            "data.source.num_train: no such key for data=voc07; data=synthetic has it",
        ),
        (["nrom=cbn"], "nrom=cbn: no such key or group; did you mean norm=cbn?"),
        (["data.num_train=3"], "data.num_train: no such key; did you mean data.source.num_train?"),
        (["--cfg", "job", "~data.bach"], "~data.bach: no such key; did you mean data.batch?"),
        # Hydra applies key=value to the config a multirun starts from (norm=bn) and stops there
        (
            ["-m", "norm=cbn,cbn_naive", "norm.window=2"],
            "norm.window: a multirun sets key=value on the config it starts from, norm=bn, which has no such key; "
            "++norm.window=2 adds it to every job (norm=cbn and norm=cbn_naive have it)",
        ),
        # ... and composes each job on its own: the gn jobs would fail after the bn ones trained
        (
            ["-m", "norm=bn,gn", "norm.momentum=0.2"],
            "norm.momentum: no such key for norm=gn; "
            "norm=bn, norm=brn, norm=cbn, norm=cbn_naive and norm=syncbn have it",
        ),
        (
            ["+optim.optimizer.amsgrad=true"],
            "+optim.optimizer.amsgrad: no such key, and torch.optim.SGD takes no argument amsgrad",
        ),
        (
            ["model.fg_iou_thresh=0.6"],
            "model.fg_iou_thresh: no such key in the config; +model.fg_iou_thresh=0.6 adds it",
        ),
    ],
)
def test_the_line_names_what_was_meant(argv: list[str], line: str) -> None:
    assert find_problem(argv) == line


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "norm=bn,cbn", "data.batch=4,8", "seed=0,1"],
        ["-m", "experiment=small_batch_study", "data.batch=2"],  # its sweeper params choose the norms
        ["-m", "norm=cbn,cbn_naive", "++norm.window=2"],
        ["experiment=voc07_ssd300", "data.keep_difficult_train=false"],  # a key set by the experiment
        ["+model.fg_iou_thresh=0.6", "+optim.optimizer.nesterov=true"],  # arguments the _target_ takes
        ["optim.optimizer._target_=torch.optim.AdamW", "+optim.optimizer.amsgrad=true"],
        ["hydra.run.dir=somewhere", "hydra.job.chdir=true", "hydra/launcher=local"],  # Hydra's own
        ["--help", "data.bach=4"],  # no job runs: Hydra answers
    ],
)
def test_valid_commands_pass(argv: list[str]) -> None:
    assert find_problem(argv) is None


def test_a_config_dir_adds_options_and_keys(tmp_path: Path) -> None:
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "mine.yaml").write_text("name: bn\nmine: 3\nwhere: [backbone]\n")
    assert find_problem(["-cd", str(tmp_path), "norm=mine", "norm.mine=4"]) is None
    mistyped = find_problem(["-cd", str(tmp_path), "norm=mine", "norm.mien=4"])
    assert mistyped == "norm.mien: no such key; did you mean norm.mine?"
    assert find_problem(["norm=mine"]) == f"norm=mine: no such option {NORMS}"


# --- the message builders, on plain key sets (for every entry point that takes overrides)

KEYS = {
    "seed",
    "data",
    "data.batch",
    "data.workers",
    "data.source",
    "data.source.num_train",
    "train",
    "train.loss_window",
}


@pytest.mark.parametrize(
    "key, line",
    [
        ("data.bach", "data.bach: no such key; did you mean data.batch?"),
        ("dta.batch", "dta.batch: no such key; did you mean data.batch?"),
        ("sed", "sed: no such key; did you mean seed?"),
        ("data.num_train", "data.num_train: no such key; did you mean data.source.num_train?"),
        ("data.window", "data.window: no such key (data: batch, source, workers)"),  # not train.loss_window
        ("nothing.at.all", "nothing.at.all: no such key"),
    ],
)
def test_nearest_key(key: str, line: str) -> None:
    assert nearest_key(key, KEYS) == line


def test_nearest_key_shows_the_key_as_written() -> None:
    assert nearest_key("data.bach", KEYS, shown="+data.bach") == "+data.bach: no such key; did you mean data.batch?"


def test_no_such_option_keeps_equally_near_options() -> None:
    assert no_such_option("norm", "bgn", ["bn", "cbn", "gn"]) == (
        "norm=bgn: no such option; did you mean norm=bn or norm=gn? (bn, cbn, gn)"
    )
    assert no_such_option("norm", "zz", ["bn", "gn"]) == "norm=zz: no such option (bn, gn)"
    assert no_such_option("norm", "bnn", ["bn", "cbn", "brn"]) == (
        "norm=bnn: no such option; did you mean norm=bn? (bn, cbn, brn)"
    )
