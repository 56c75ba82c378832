"""The detector a run trains or evaluates, built from the config in one place: the model, its norm
(with CBN's burn-in resolved), and the speed options. Shared by training, evaluation and the
benchmarks, so that a checkpoint always meets the network it was trained as."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbn_detect.models import build_detector
from cbn_detect.norm import convert_norm, resolve_burnin, use_native_sync_batchnorm

log = logging.getLogger("cbn_detect.train")  # its line reads as the run's own in train.log, as before


def build_model(cfg: DictConfig, num_classes: int, device: torch.device, total_steps: int | None = None) -> nn.Module:
    """The detector with the configured norm, on ``device``, with the speed options applied.

    ``total_steps`` (training iterations per process) turns a fractional ``norm.burnin`` into
    iterations. On CUDA, SyncBN runs as torch's ``nn.SyncBatchNorm`` (same state, fused kernels).
    ``train.compile`` compiles the backbone and head in place (``Module.compile``), which keeps
    parameter names and therefore checkpoints unchanged; torchvision's loss and post-processing
    loop over images with data-dependent shapes and stay eager.
    """
    model = build_detector(cfg.model, num_classes=num_classes)
    norm_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.norm, resolve=True).items() if k != "name"}
    if "burnin" in norm_kwargs:
        norm_kwargs["burnin"] = resolve_burnin(norm_kwargs["burnin"], total_steps)
        log.info("norm %s: plain-BN burn-in of %d iterations", cfg.norm.name, norm_kwargs["burnin"])
    model = convert_norm(model, str(cfg.norm.name), **norm_kwargs).to(device)
    if device.type == "cuda":
        model = use_native_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.backbone.compile()
        model.head.compile()
    return model
