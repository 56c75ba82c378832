"""`python -m cbn_detect.evaluate`: a trained run's checkpoint scored again gives the run's own
numbers, in one process or sharded over several; other splits; bad input in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbn_detect.evaluate import load_config, main
from cbn_detect.voc_eval import main as voc_eval_main
from tests.conftest import REPO, TINY_RUN

# One epoch of the tiny run; a low score threshold, so that one epoch's weights already detect
# something (a mAP of 0 would make the comparisons below empty).
RUN = [*TINY_RUN, "train.epochs=1", "model.score_thresh=0.001", "wandb.mode=disabled"]
SCORES = ("map_voc07", "map_area", "ap_per_class", "ap_metric", "coco", "num_detections")


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of the trained run without other tests' evaluations: tests never share output files."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("eval_*"))
    return to


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained by the real entry point, as a user would."""
    root = tmp_path_factory.mktemp("evaluate")
    done = _python(sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={root / 'run'}", *RUN, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


def test_the_checkpoint_scores_exactly_what_the_run_recorded(run_dir: Path, tmp_path: Path) -> None:
    run_dir = copy_run(run_dir, tmp_path / "run")
    recorded = (run_dir / "results.json").read_bytes()
    done = _python(sys.executable, "-m", "cbn_detect.evaluate", str(run_dir), cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    results = json.loads(recorded)
    scored = strict_json(run_dir / "eval_test.json")
    assert results["map_voc07"] > 0  # something to compare
    assert {k: scored[k] for k in SCORES} == {k: results[k] for k in SCORES}
    assert scored["split"] == "test" and scored["images"] == 8 and scored["epoch"] == 1
    assert scored["fps"]["fps_model"] > 0
    # The same detections, byte for byte, in their own folder; results.json untouched.
    ours = sorted((run_dir / "eval_test").glob("comp4_det_test_*.txt"))
    assert [p.name for p in ours] == sorted(p.name for p in (run_dir / "detections").glob("*.txt"))
    assert all(p.read_bytes() == (run_dir / "detections" / p.name).read_bytes() for p in ours)
    assert (run_dir / "results.json").read_bytes() == recorded


def test_torchrun_shards_the_evaluation_and_gets_the_same_numbers(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path / "run")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = _python(
        str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cbn_detect.evaluate", str(run),
        "eval.fps_images=0", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    scored = strict_json(run / "eval_test.json")
    assert scored["world_size"] == 2 and "fps" not in scored
    assert scored["num_detections"] == results["num_detections"]
    assert scored["map_voc07"] == pytest.approx(results["map_voc07"], abs=1e-9)
    assert scored["ap_per_class"] == pytest.approx(results["ap_per_class"], abs=1e-9)


def test_another_split_from_a_checkpoint_path_as_two_processes(run_dir: Path, tmp_path: Path) -> None:
    """processes=N launches the shards itself; the devkit files it writes score the same with voc_eval."""
    run = copy_run(run_dir, tmp_path / "run")
    recorded = (run / "results.json").read_bytes()
    argv = [str(run / "checkpoints" / "last.pt"), "data.test_split=val", "eval.fps_images=0", "processes=2"]
    assert main(argv) == 0
    scored = strict_json(run / "eval_val.json")
    assert scored["split"] == "val" and scored["images"] == 4 and scored["world_size"] == 2
    assert "fps" not in scored and not (run / "eval_test.json").exists()
    assert (run / "results.json").read_bytes() == recorded
    # voc_eval finds the synthetic set's classes itself (its params.json) and agrees.
    out = tmp_path / "voc_eval.json"
    argv = ["--voc-dir", scored["dataset"], "--split", "val", "--results", str(run / "eval_val"), "--json", str(out)]
    assert voc_eval_main(argv) == 0
    assert json.loads(out.read_text())["mAP"] == scored["map_voc07"]


def test_a_folder_without_a_run_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = _python(sys.executable, "-m", "cbn_detect.evaluate", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"evaluate: error: {tmp_path}: not a run of cbn_detect.train (")


MISTAKES = {
    "no checkpoint": ([], "no checkpoint to evaluate"),
    "sweep": (["seed=0,1"], "seed=0,1: evaluate takes one value per key, not a sweep"),
    "model": (["model=ssd300"], "model=ssd300: the checkpoint fixes the model (retinanet_tiny with bn)"),
    "typo": (["eval.fps_image=0"], "eval.fps_image=0: the run's config has no key eval.fps_image"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistakes_are_one_line_and_exit_2(run_dir: Path, tmp_path: Path, capsys, case: str) -> None:
    overrides, expected = MISTAKES[case]
    run = tmp_path / "run"
    shutil.copytree(run_dir / ".hydra", run / ".hydra")
    if case != "no checkpoint":
        shutil.copytree(run_dir / "checkpoints", run / "checkpoints")
    assert main([str(run), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate: error: ") and expected in err
    assert not list(run.glob("eval_*"))


def test_overrides_apply_to_the_saved_config_and_data_can_switch(run_dir: Path) -> None:
    root = "/datasets/VOCdevkit"
    cfg = load_config(run_dir, ["data=voc07", f"data.root={root}", "data.test_split=val", "eval.coco=false"])
    assert (cfg.data.name, cfg.data.root, cfg.data.source.root) == ("voc07", root, root)
    assert cfg.data.test_split == "val" and cfg.eval.coco is False
    assert cfg.model.min_size == 64 and cfg.model.score_thresh == 0.001  # the run's own, not the defaults
    assert cfg.processes == 1
