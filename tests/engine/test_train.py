"""Training end to end on the synthetic data: one step, a whole tiny run, a sweep, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cbn_detect.data.build import build_dataset, class_names, collate, dataset_source
from cbn_detect.data.voc import resolve_voc_root
from cbn_detect.engine.checkpoint import FORMAT
from cbn_detect.engine.optim import build_optimizer
from cbn_detect.engine.preflight import RunSkipped
from cbn_detect.models import build_detector
from cbn_detect.results import FIELDS, SCHEMA_VERSION
from cbn_detect.train import run
from tests.conftest import CONF_DIR, REPO, TINY_RUN
from tests.helpers.voc_reference import reference_ap

# A completed run fills every field of the schema but the two that explain a run that did not.
COMPLETED_KEYS = set(FIELDS) - {"error", "reason"}


def tiny_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY_RUN, *overrides])


def test_one_training_step_gives_a_finite_loss_and_changes_the_parameters() -> None:
    cfg = tiny_cfg("optim.warmup.iters=0")  # at warmup's 1e-5 lr, fp32 rounds tiny updates away
    torch.manual_seed(0)
    dataset = build_dataset(cfg.data, train=True)
    model = build_detector(cfg.model, num_classes=len(class_names(cfg.data))).train()
    optimizer = build_optimizer(model, cfg.optim, total_batch=4)
    images, targets = collate([dataset[i] for i in range(4)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.item() > 0
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    changed = {name: not torch.equal(before[name], p) for name, p in model.named_parameters()}
    assert all(v for name, v in changed.items() if name.startswith("backbone.body."))
    # At 64 px the coarsest level may hold no positive anchor; its norms then see ~1e-7 gradients.
    assert sum(changed.values()) >= 0.9 * len(changed)


def test_a_tiny_run_writes_complete_results(tmp_path: Path) -> None:
    # a score threshold low enough that the barely trained model's detections get written and scored
    results = run(tiny_cfg("model.score_thresh=0.001"), tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results.to_dict()))
    assert set(on_disk) == COMPLETED_KEYS
    assert on_disk["status"] == "completed"
    voc = resolve_voc_root(dataset_source(tiny_cfg().data).root, "2007")  # the hashed synthetic folder, recorded
    assert (on_disk["dataset_dir"], on_disk["test_split"]) == (str(voc.absolute()), "test")
    assert on_disk["steps"] == 2 * (16 // 4) and on_disk["epochs"] == 2
    # The mAP is the devkit's on the run's own detection files and the test split's XML, both read
    # here and scored by the plain-loop reference of test_voc_ap (not by cbn_detect's evaluation).
    names = class_names(tiny_cfg().data)
    gt, dets = _devkit_inputs(tmp_path / "detections", tiny_cfg().data, names)
    assert sum(len(d) for d in dets) > 0  # the reference must have something to score
    expected_ap = reference_ap(gt, dets, len(names), "voc07")
    scored = [ap for ap in expected_ap.values() if ap is not None]
    assert on_disk["map_voc07"] == pytest.approx(sum(scored) / len(scored), rel=1e-9, abs=1e-12)
    assert on_disk["ap_per_class"] == pytest.approx({n: expected_ap[k] for k, n in enumerate(names, 1)}, abs=1e-12)
    assert set(on_disk["ap_per_class"]) == set(class_names(tiny_cfg().data))
    assert on_disk["fps"]["fps_model"] > 0 and on_disk["fps"]["batch"] == 1
    # the population variance of the last epoch's 4 per-step losses, as metrics.jsonl logged them
    last_epoch = [
        json.loads(line)["loss"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line and json.loads(line).get("epoch") == 2
    ]
    assert len(last_epoch) == 4
    assert on_disk["loss_variance"] == pytest.approx(float(np.var(last_epoch)), rel=1e-9)
    assert on_disk["final_loss"] == last_epoch[-1]
    assert (tmp_path / "results_batch_4.txt").read_text().startswith("model: retinanet_tiny")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"loss/classification", "loss/bbox_regression", "lr", "grad_norm"} <= set(r) for r in steps)
    assert any("eval/map_voc07" in r for r in records)
    # Both files record the layouts this code writes; torch records each norm layer's state version.
    assert on_disk["schema_version"] == SCHEMA_VERSION
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["format"] == FORMAT
    norms = {key.removesuffix(".running_mean") for key in checkpoint["model"] if key.endswith(".running_mean")}
    assert norms and {checkpoint["model"]._metadata[n]["version"] for n in norms} == {torch.nn.BatchNorm2d._version}
    assert len(list((tmp_path / "detections").glob("comp4_det_test_*.txt"))) == len(on_disk["ap_per_class"])


def test_train_compile_compiles_backbone_and_head_in_place_keeping_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile`` compiles exactly the backbone and the head, in place (``Module.compile``):
    the state_dict keys stay those of the eager model, so checkpoints load both ways, and the
    compiled model detects as the eager one with the same weights. Dynamo captures the graphs for
    real; the backend is switched to "eager" because inductor's codegen takes minutes on 2 cores."""
    from torch import nn

    from cbn_detect.engine.build import build_model

    compiled: list[nn.Module] = []
    compile_module = nn.Module.compile

    def compile_eager(self: nn.Module, *args, **kwargs) -> None:
        compiled.append(self)
        compile_module(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(nn.Module, "compile", compile_eager)
    torch.manual_seed(0)
    model = build_model(tiny_cfg("train.compile=true"), num_classes=6, device=torch.device("cpu")).eval()
    assert compiled == [model.backbone, model.head]
    assert model.backbone._compiled_call_impl is not None and model.head._compiled_call_impl is not None
    eager = build_model(tiny_cfg(), num_classes=6, device=torch.device("cpu")).eval()
    assert eager.backbone._compiled_call_impl is None and len(compiled) == 2
    assert list(model.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(model.state_dict())
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        features, eager_features = model.backbone(torch.stack(images)), eager.backbone(torch.stack(images))
        assert list(features) == list(eager_features)
        for key in features:
            torch.testing.assert_close(features[key], eager_features[key], rtol=1e-5, atol=1e-6)
        got, expected = model(images), eager(images)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-5, atol=1e-4)


def _normwise_error(got: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / reference.double().norm().clamp_min(1e-30))


def _one_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    """The loss and every gradient of one training step (forward and backward, no update)."""
    model.zero_grad(set_to_none=True)
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    return {
        "loss": loss.detach(),
        **{n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
    }


def test_train_compile_with_cbn_compiles_once_and_a_step_matches_the_eager_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.compile=true norm=cbn`` through the CLI with inductor for real (its cache in tmp_path,
    so it compiles from scratch): inductor generates code and CBN's per-step state triggers no
    recompilation (which, traced, made every training step recompile the backbone: 80 s a step for
    the tiny model on 2 cores).

    What compilation must keep equal is one step, not a trajectory: inductor's CPU code is
    vectorised for the machine it runs on, so its rounding differs from eager's by an amount that
    depends on the instruction set, and SGD amplifies any such difference step after step (an
    AVX2 machine's losses drift 4.5e-4 apart by the 6th step). So from the compiled run's last
    checkpoint (CBN's window full, past its burn-in) one more step runs eagerly in float32, eagerly in
    float64, and compiled; the compiled loss and gradients must be as close to the eager float32
    ones as float32 rounding allows, measured on the step itself: within a few times the eager
    float32 step's own distance from float64 (norm-wise per tensor). A wrong compiled CBN path
    (stale window, missing compensation) is off by orders of magnitude more."""
    import copy

    from cbn_detect.engine.build import build_model

    args = [*TINY_RUN, "norm=cbn", "norm.burnin=2", "train.compile=true", f"hydra.run.dir={tmp_path / 'run'}"]
    cache = tmp_path / "inductor"
    compiled_run = _train(args, tmp_path, extra_env={"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCH_LOGS": "recompiles"})
    assert compiled_run.returncode == 0, compiled_run.stderr[-3000:]
    assert any(cache.rglob("*.py")), "inductor generated no code: nothing was compiled"
    guard_failures = [line for line in compiled_run.stderr.splitlines() if "__recompiles" in line and " - " in line]
    assert not [line for line in guard_failures if "num_steps" in line or "_count" in line or "_next" in line]

    cfg = tiny_cfg("norm=cbn", "norm.burnin=2")
    payload = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    dataset = build_dataset(cfg.data, train=True)
    images, targets = collate([dataset[i] for i in range(4)])
    steps: dict[str, dict[str, torch.Tensor]] = {}
    for name, dtype, compiled in (
        ("eager32", torch.float32, False),
        ("eager64", torch.float64, False),
        ("compiled", torch.float32, True),
    ):
        model = build_model(cfg, num_classes=len(class_names(cfg.data)), device=torch.device("cpu"), total_steps=8)
        model.load_state_dict(copy.deepcopy(payload["model"]))
        model.to(dtype).train()
        if compiled:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # the run's kernels: no second codegen
            model.backbone.compile()
            model.head.compile()
        steps[name] = _one_step(
            model,
            [image.to(dtype) for image in images],
            [
                {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in t.items()}
                for t in targets
            ],
        )
    eager32, eager64, got = steps["eager32"], steps["eager64"], steps["compiled"]
    assert set(got) == set(eager32) and len(got) > 10
    for key in eager32:
        rounding = _normwise_error(eager32[key], eager64[key], eager64[key])
        difference = _normwise_error(got[key], eager32[key], eager64[key])
        assert difference <= max(8 * rounding, 1e-6), (key, difference, rounding)


def _devkit_inputs(detections: Path, data_cfg, names) -> tuple[list, list]:
    """(ground truth, detections) of the test split as test_voc_ap's reference takes them: per image,
    (label, VOC box, difficult) from the XML and (label, score, VOC box) from the comp4 files, in
    file order."""
    voc = resolve_voc_root(dataset_source(data_cfg).root, data_cfg.year)
    image_ids = (voc / "ImageSets" / "Main" / f"{data_cfg.test_split}.txt").read_text().split()
    gt = []
    for image_id in image_ids:
        root = ET.parse(voc / "Annotations" / f"{image_id}.xml").getroot()
        gt.append(
            [
                (
                    names.index(obj.findtext("name").strip()) + 1,
                    tuple(float(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")),
                    obj.findtext("difficult", "0").strip() == "1",
                )
                for obj in root.findall("object")
            ]
        )
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    dets: list[list] = [[] for _ in image_ids]
    for label, name in enumerate(names, start=1):
        for line in (detections / f"comp4_det_{data_cfg.test_split}_{name}.txt").read_text().splitlines():
            image_id, score, *box = line.split()
            dets[index[image_id]].append((label, float(score), tuple(map(float, box))))
    return gt, dets


def _train(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_two_job_multirun_writes_one_directory_per_grid_point(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _train(["-m", "norm=bn,none", f"hydra.sweep.dir={sweep}", *TINY_RUN], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for norm in ("bn", "none"):
        results = json.loads((sweep / "retinanet_tiny" / norm / "batch_4" / "seed_0" / "results.json").read_text())
        assert results["status"] == "completed" and results["norm"] == norm
    report = subprocess.run(
        [sys.executable, "-m", "cbn_detect.report", str(sweep)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    summary = report.stdout.split("## Paired")[0]  # the paired-difference table follows the summary
    rows = [line for line in summary.splitlines() if line.startswith("| retinanet_tiny")]
    assert len(rows) == 2 and "1 completed" in rows[0]
    assert (sweep / "report.md").exists() and (sweep / "results.csv").read_text().count("\n") == 3


def test_a_missing_dataset_is_one_clear_error_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "VOCdevkit"
    proc = _train(["data=voc07", f"data.root={missing}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert str(missing) in output and "data=synthetic" in output
    assert "Traceback" not in output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and str(missing) in results["error"]


def test_a_completed_run_is_not_redone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "map_voc07": 0.25}))
    proc = _train([f"hydra.run.dir={run_dir}", *TINY_RUN], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text()) == {"status": "completed", "map_voc07": 0.25}
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, setting", [("data.batch=0", "data.batch"), ("data.batch=64", "data.batch")])
def test_bad_batch_names_the_setting(tmp_path: Path, override: str, setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        run(tiny_cfg(override), tmp_path)


def test_batch_one_on_a_1x1_feature_map_is_skipped_with_advice(tmp_path: Path) -> None:
    """BN at one image on a 1x1 map cannot train: the job records why and the command succeeds,
    so a sweep's report shows the cell as skipped instead of a crash."""
    overrides = [o for o in TINY_RUN if not o.startswith("model.")]
    proc = _train(
        [*overrides, "model=ssd_tiny", "model.size=64", "data.batch=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "skipped" and results["norm"] == "bn" and results["batch"] == 1
    assert "1x1 feature map" in results["reason"] and "norm=gn" in results["reason"]
    assert "norm=cbn with norm.burnin=0" in results["reason"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cbn_at_batch_one_on_a_1x1_map_is_skipped_during_burn_in_and_runs_without_it(tmp_path: Path) -> None:
    overrides = [o for o in TINY_RUN if not o.startswith("model.")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        burn_in = compose(
            "config", overrides=[*overrides, "model=ssd_tiny", "model.size=64", "data.batch=1", "norm=cbn"]
        )
        no_burn_in = compose(
            "config",
            overrides=[
                *overrides,
                "model=ssd_tiny",
                "model.size=64",
                "data.batch=1",
                "norm=cbn",
                "norm.burnin=0",
                "train.epochs=1",
            ],
        )
    with pytest.raises(RunSkipped, match=r"burn-in \(21 iterations\).*norm.burnin=0"):
        run(burn_in, tmp_path / "burn_in")  # 16 images x 2 epochs at batch 1: int(0.6667 x 32) = 21
    assert run(no_burn_in, tmp_path / "no_burn_in").status == "completed"
