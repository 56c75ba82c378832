"""Every option of every config group composes, the experiments are what they claim, and the
data groups build their datasets (VOC07+12 concatenates two years)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import ConcatDataset

from cbn_detect.data.build import build_dataset, dataset_problems
from cbn_detect.engine.optim import scaled_lr
from tests.conftest import CONF_DIR
from tests.helpers.voc_fixture import STANDARD_IMAGES, STANDARD_SPLITS, write_voc

GROUPS = ("model", "norm", "data", "optim", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group: str, option: str) -> None:
    from omegaconf import OmegaConf

    cfg = composed(f"{group}={option}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["batch"] >= 1 and resolved["norm"]["name"] in {p for p in options("norm")}


def test_defaults_are_the_cpu_demo() -> None:
    cfg = composed()
    assert (cfg.model.name, cfg.norm.name, cfg.data.name, cfg.optim.name) == (
        "retinanet_tiny",
        "bn",
        "synthetic",
        "sgd",
    )
    assert cfg.device == "auto"


def test_the_voc07_retinanet_recipe() -> None:
    cfg = composed("experiment=voc07_retinanet_r50", "norm=cbn")
    assert (cfg.model.name, cfg.data.name, cfg.model.min_size, cfg.model.max_size) == (
        "retinanet_r50",
        "voc07",
        600,
        1000,
    )
    assert cfg.data.train_split == "trainval" and cfg.data.test_split == "test"
    assert scaled_lr(cfg.optim, total_batch=16) == pytest.approx(0.01)
    assert cfg.norm.burnin == 0.6667  # the CBN authors' 8 of 12 epochs
    assert cfg.train.epochs >= 100


def test_voc0712_trains_on_both_years_and_tests_on_voc2007(tmp_path: Path) -> None:
    write_voc(tmp_path, STANDARD_IMAGES, STANDARD_SPLITS)
    write_voc(tmp_path / "other", STANDARD_IMAGES[:2], {"trainval": ("000001", "000002")})
    (tmp_path / "other" / "VOCdevkit" / "VOC2007").rename(tmp_path / "VOCdevkit" / "VOC2012")
    cfg = composed("data=voc0712", f"data.root={tmp_path / 'VOCdevkit'}")
    train = build_dataset(cfg.data, train=True, transforms=instantiate(cfg.augment))
    test = build_dataset(cfg.data, train=False)
    assert isinstance(train, ConcatDataset) and len(train) == 3 + 2
    assert len(test) == len(STANDARD_SPLITS["test"])
    assert [p["split"] for p in dataset_problems(train)] == ["VOC2007/trainval", "VOC2012/trainval"]
