"""Shared test settings: a private synthetic-data cache and W&B folders, tiny run overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# A run small enough for a few seconds of CPU: 16 training and 8 test images of 64 px.
TINY_RUN = [
    "data.source.num_train=16",
    "data.source.num_val=4",
    "data.source.num_test=8",
    "data.source.image_size=64",
    "model.min_size=64",
    "model.max_size=64",
    "data.batch=4",
    "train.epochs=2",
    "train.log_every=1",
    "eval.fps_images=2",
    "eval.fps_warmup=1",
    "optim.warmup.iters=2",
    "device=cpu",
]


def write(path: Path, text: str) -> Path:
    """Writes `text` as UTF-8 (whatever the locale), making the folders it needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def single_thread():
    """For tiny models: on shared CPU cores, extra intra-op threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never write into the user's ~/.cache or W&B folders."""
    root = tmp_path_factory.mktemp("caches")
    env = {
        "CBN_DETECT_CACHE": str(root / "cbn_detect"),
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "WANDB_MODE": "offline",
    }
    os.environ.update(env)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return root
