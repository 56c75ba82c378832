"""Speed options are off-able and numerically checked against the plain fp32 path on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cbn_detect.engine.build import build_model
from cbn_detect.engine.precision import Precision
from cbn_detect.train import run
from tests.conftest import CONF_DIR, TINY_RUN


def tiny_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY_RUN, *overrides])


def test_an_unknown_precision_names_the_setting() -> None:
    with pytest.raises(ValueError, match="train.amp"):
        Precision("fp8", torch.device("cpu"))


def test_bf16_and_channels_last_losses_stay_close_to_fp32() -> None:
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])} for _ in range(2)]
    losses = {}
    for amp, channels_last in [("off", False), ("bf16", True)]:
        cfg = tiny_cfg(f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}")
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=6, device=torch.device("cpu")).train()
        with Precision(amp, torch.device("cpu")).autocast():
            losses[amp] = {k: v.float().item() for k, v in model(images, targets).items()}
    for term, value in losses["off"].items():
        assert losses["bf16"][term] == pytest.approx(value, rel=0.05), term


def test_a_bf16_run_completes_and_records_its_precision(tmp_path: Path) -> None:
    run(tiny_cfg("train.amp=bf16", "train.epochs=1", "eval.coco=false"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["amp"] == "bf16"
    assert results["final_loss"] > 0


def test_the_fp16_loss_scale_is_checkpointed(tmp_path: Path) -> None:
    precision = Precision("fp16", torch.device("cpu"))
    if not precision.scaler.is_enabled():
        pytest.skip("this torch build has no fp16 GradScaler on CPU")
    run(tiny_cfg("train.amp=fp16", "train.epochs=1", "eval.coco=false"), tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["scaler"]
    assert saved["scale"] > 0 and "_growth_tracker" in saved
