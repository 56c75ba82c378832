"""Detectors trained from scratch, built with BatchNorm everywhere (the norm is swapped afterwards)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbn_detect.models.retinanet import build_retinanet
from cbn_detect.models.ssd import build_ssd

__all__ = ["build_detector", "build_retinanet", "build_ssd"]


def build_detector(model_cfg: DictConfig, num_classes: int) -> nn.Module:
    """Instantiate the ``model`` config group's ``_target_`` with its kwargs (``name`` is a label)."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    kwargs.pop("name", None)
    return hydra.utils.instantiate(kwargs, num_classes=num_classes)
