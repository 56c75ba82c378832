"""DDP through torchrun on CPU (gloo): two processes train one SyncBN run (DDP accepts our CPU
SyncBN), rank 0 writes it, and the sharded evaluation equals a single-process evaluation of the
checkpointed weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cbn_detect.data.build import build_dataset, class_names
from cbn_detect.engine.build import build_model
from cbn_detect.evaluation.evaluator import evaluate
from cbn_detect.models.fold import inference_copy
from cbn_detect.runtime import DistInfo
from tests.conftest import CONF_DIR, REPO, TINY_RUN


@pytest.mark.slow
def test_torchrun_two_processes_match_a_single_process_evaluation(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Batch 1 at evaluation: shards of different sizes then batch exactly like one process does.
    overrides = [
        *TINY_RUN,
        "norm=syncbn",
        "eval.coco=false",
        "eval.batch=1",
        "diagnostics.level=off",
        "model.score_thresh=0.0",
    ]  # keep every candidate: a 2-epoch model scores below 0.05
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "cbn_detect.train",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert (results["world_size"], results["batch"], results["total_batch"]) == (2, 4, 8)
    assert results["steps"] == 2 * (16 // 8)  # each process sees half of every epoch
    assert (run_dir / "checkpoints" / "last.rank1.pt").exists()  # per-process state (CBN history)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    classes = class_names(cfg.data)
    net = build_model(cfg, len(classes), torch.device("cpu"))
    net.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"])
    test_set = build_dataset(cfg.data, train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): same kernels, same rounding
    try:
        single = evaluate(
            inference_copy(net),
            test_set,
            test_set.ground_truth(),
            classes,
            torch.device("cpu"),
            DistInfo(),
            batch=1,
            workers=0,
            metrics=["voc07"],
            coco=False,
            detections_dir=tmp_path / "single",
            split="test",
        )
    finally:
        torch.set_num_threads(threads)
    assert single["map_voc07"] == results["map_voc07"]
    assert single["ap_per_class"] == results["ap_per_class"]
    # Bit-exact detections, scores included: both shards used rank 0's BN running statistics, and
    # both evaluations the same folded inference copy (the fast path every evaluation takes).
    assert results["num_detections"] > 0
    for path in sorted((tmp_path / "single").glob("comp4_det_test_*.txt")):
        assert path.read_text() == (run_dir / "detections" / path.name).read_text(), path.name
