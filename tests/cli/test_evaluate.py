"""`python -m cbn_detect.evaluate`: a trained run's checkpoint scored again gives the run's own
numbers, in one process or sharded over several; other splits; bad input in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbn_detect.data.build import class_names
from cbn_detect.engine.build import build_model
from cbn_detect.engine.checkpoint import TrainState, compare_state_dicts, norm_layers, save_checkpoint
from cbn_detect.engine.precision import Precision
from cbn_detect.evaluate import load_config, main
from cbn_detect.norm import NORM_NAMES
from cbn_detect.voc_eval import main as voc_eval_main
from tests.conftest import CONF_DIR, REPO, TINY_RUN

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


@pytest.mark.slow
def test_torchrun_shards_the_evaluation_and_gets_the_same_numbers(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path / "run")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = _python(
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "cbn_detect.evaluate",
        str(run),
        "eval.fps_images=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    scored = strict_json(run / "eval_test.json")
    assert scored["world_size"] == 2 and "fps" not in scored
    assert scored["num_detections"] == results["num_detections"]
    assert scored["map_voc07"] == pytest.approx(results["map_voc07"], abs=1e-9)
    assert scored["ap_per_class"] == pytest.approx(results["ap_per_class"], abs=1e-9)


@pytest.mark.slow
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
    "typo": (["eval.fps_image=0"], "eval.fps_image=0: no such key; did you mean eval.fps_images?"),
    "added typo": (["+eval.fps_image=0"], "+eval.fps_image=0: no such key; did you mean eval.fps_images?"),
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


# --- Checkpoints that do not fit, or stand alone (issue 21) ---------------------------------------

KEY = re.compile(r"\b\w+(?:\.\w+)+\.(?:weight|bias|running_mean|running_var|num_batches_tracked|_extra_state)\b")


def _evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _python(sys.executable, "-m", "cbn_detect.evaluate", *args, cwd=cwd)


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failure reported to the user (exit 2)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("evaluate: error: "), done.stderr[-3000:]
    return done.stderr.rstrip("\n")


def _evidence(line: str) -> list[str]:
    """The state-dict keys a mismatch message shows after its "e.g.": a few, never a list of all."""
    return KEY.findall(line.split(" e.g. ", 1)[1])


def _config(*groups: str) -> dict:
    """The config a tiny run trained with ``groups`` switched (``model=ssd_tiny``) composes; with
    another model, without the run's model.* overrides (they are RetinaNet's keys)."""
    other_model = any(group.startswith("model=") for group in groups)
    overrides = [o for o in RUN if not (other_model and o.startswith("model."))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, *groups])
    return OmegaConf.to_container(cfg)


def foreign_run(run_dir: Path, to: Path, *groups: str, carry_config: bool) -> Path:
    """A copy of the run whose checkpoint holds what a run with ``groups`` switched saves (the
    package's own builders and save_checkpoint on that config): another run's checkpoint dropped
    into this folder. ``carry_config``: as checkpoints since issue 21; else as older ones."""
    run = to / "run"
    shutil.copytree(run_dir / ".hydra", run / ".hydra")
    config = _config(*groups)
    cfg = OmegaConf.create(config)
    net = build_model(cfg, len(class_names(cfg.data)), torch.device("cpu"), total_steps=4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(
        run / "checkpoints" / "last.pt",
        net,
        optimizer,
        scheduler,
        TrainState(epoch=1, step=4),
        Precision("off", torch.device("cpu")),
        config=config if carry_config else None,
    )
    return run


def test_a_checkpoint_copied_out_of_its_run_is_evaluated_with_the_config_it_carries(
    run_dir: Path, tmp_path: Path
) -> None:
    checkpoint = run_dir / "checkpoints" / "last.pt"
    saved = torch.load(checkpoint, weights_only=False)["config"]
    assert saved == OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))  # interpolations kept
    lone = tmp_path / "elsewhere" / "retina_bn.pt"
    lone.parent.mkdir()
    shutil.copyfile(checkpoint, lone)
    done = _evaluate(str(lone), "eval.fps_images=0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    # Its scores beside it, named after it; the same numbers as the run's own evaluation.
    assert sorted(p.name for p in lone.parent.iterdir()) == [
        "retina_bn.eval_test",
        "retina_bn.eval_test.json",
        "retina_bn.pt",
    ]
    scored = strict_json(lone.parent / "retina_bn.eval_test.json")
    results = json.loads((run_dir / "results.json").read_text())
    assert {k: scored[k] for k in SCORES} == {k: results[k] for k in SCORES}
    assert scored["checkpoint"] == str(lone) and scored["model"] == "retinanet_tiny" and scored["norm"] == "bn"
    assert sorted((lone.parent / "retina_bn.eval_test").glob("comp4_det_test_*.txt"))


def test_weights_of_another_model_say_it_is_another_model(run_dir: Path, tmp_path: Path) -> None:
    run = foreign_run(run_dir, tmp_path, "model=ssd_tiny", carry_config=True)
    line = _error_line(_evaluate(str(run), cwd=tmp_path))
    checkpoint = run / "checkpoints" / "last.pt"
    assert line.startswith(
        f"evaluate: error: checkpoint {checkpoint} holds another model than retinanet_tiny with bn: it is an SSD, "
        "retinanet_tiny a RetinaNet ("
    )
    assert "unexpected backbone.trunk.body.conv1.weight" in line and "missing backbone.body.conv1.weight" in line
    assert 1 <= len(_evidence(line)) <= 3
    # It carries its config: the way out is to evaluate it on its own.
    assert line.endswith(
        "its own config says ssd_tiny with bn: evaluate a copy of it outside this run folder, which uses that config"
    )
    assert not list(run.glob("eval_*"))


def test_weights_of_another_norm_say_it_is_another_norm(run_dir: Path, tmp_path: Path) -> None:
    run = foreign_run(run_dir, tmp_path, "norm=gn", carry_config=False)  # an older checkpoint: no config
    line = _error_line(_evaluate(str(run), cwd=tmp_path))
    assert line == (
        f"evaluate: error: checkpoint {run / 'checkpoints' / 'last.pt'} holds another norm than retinanet_tiny "
        "with bn: "
        "its norm layers are GroupNorm (weight and bias only, no running_mean/running_var) where bn has BatchNorm "
        "(running_mean, running_var and num_batches_tracked: bn, syncbn or brn); e.g. missing "
        "backbone.body.bn1.running_mean, backbone.body.bn1.running_var, backbone.body.bn1.num_batches_tracked; "
        "evaluate it in the run folder it was trained in"
    )


def test_another_number_of_classes_names_the_count_and_the_dataset(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path / "run")
    line = _error_line(_evaluate(str(run), "data.classes=[circle,square,triangle]", cwd=tmp_path))
    checkpoint = run / "checkpoints" / "last.pt"
    assert line.startswith(
        f"evaluate: error: checkpoint {checkpoint} was trained for 6 classes, but data synthetic as configured here "
        "has 3 (the class-score layers differ in size), e.g. resized head.classification_head.cls_logits.weight "
    )
    assert line.endswith("; evaluate it on a dataset with those 6 classes (it was trained on data=synthetic)")
    assert 1 <= len(_evidence(line)) <= 3
    assert not list(run.glob("eval_*"))


def test_a_truncated_checkpoint_is_corrupt_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path / "run")
    checkpoint = run / "checkpoints" / "last.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # a copy cut short
    line = _error_line(_evaluate(str(run), cwd=tmp_path))
    # torch 2.x: "PytorchStreamReader failed reading zip archive: failed finding central directory"
    assert line.startswith(f"evaluate: error: checkpoint {checkpoint} is corrupt or truncated (RuntimeError: ")
    assert not list(run.glob("eval_*"))


def test_no_argument_asks_for_the_target_only(capsys) -> None:
    """Not "required: target, overrides": the overrides are optional (argparse's nargs="*" quirk)."""
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "python -m cbn_detect.evaluate: error: the following arguments are required: target"


def _empty(run: Path, tmp_path: Path) -> tuple[Path, str]:
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    return run, f"checkpoint {run / 'checkpoints' / 'last.pt'} is corrupt or truncated (an empty file)"


def _older_on_its_own(run: Path, tmp_path: Path) -> tuple[Path, str]:
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    del payload["config"], payload["format"]  # as checkpoints were written before they carried either
    lone = tmp_path / "old.pt"
    torch.save(payload, lone)
    return lone, f"{lone}: not in a run of cbn_detect.train ({tmp_path.parent / '.hydra' / 'config.yaml'} not found)"


def _not_a_checkpoint(run: Path, tmp_path: Path) -> tuple[Path, str]:
    (run / "checkpoints" / "last.pt").write_text("not a checkpoint\n")
    return run, f"{run / 'checkpoints' / 'last.pt'} is not a checkpoint torch can read ("


UNUSABLE = {"empty": _empty, "older checkpoint on its own": _older_on_its_own, "not a checkpoint": _not_a_checkpoint}


@pytest.mark.parametrize("case", UNUSABLE)
def test_unusable_checkpoint_files_are_one_line_and_exit_2(run_dir: Path, tmp_path: Path, capsys, case: str) -> None:
    run = copy_run(run_dir, tmp_path / "run")
    target, expected = UNUSABLE[case](run, tmp_path)
    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"evaluate: error: {expected}")
    assert not list(tmp_path.rglob("*eval_*"))


NORM_FAMILIES = {
    "bn": {"BatchNorm"},
    "syncbn": {"BatchNorm"},
    "brn": {"BatchNorm"},
    "cbn": {"CBN"},
    "cbn_naive": {"CBN"},
    "gn": {"GroupNorm"},
    "frozenbn": {"FrozenBN"},
    "none": set(),
}


@pytest.mark.parametrize("model", ["retinanet_tiny", "ssd_tiny"])
def test_every_norm_is_told_apart_by_its_keys_alone(model: str) -> None:
    """What the messages above rest on, for every norm of the study: the state dict's keys name
    the norm family; norms of one family load into each other, others never."""
    assert set(NORM_FAMILIES) == set(NORM_NAMES)
    states = {}
    for norm in NORM_NAMES:
        cfg = OmegaConf.create(_config(f"model={model}", f"norm={norm}"))
        states[norm] = build_model(cfg, 6, torch.device("cpu"), total_steps=4).state_dict()
        assert set(norm_layers(states[norm]).values()) == NORM_FAMILIES[norm], norm
    for norm, state in states.items():
        diff = compare_state_dicts(state, states["bn"])
        assert not diff.model_differs and not diff.classes_differ
        assert diff.fits == (NORM_FAMILIES[norm] == {"BatchNorm"}) == (not diff.norm_differs), norm
