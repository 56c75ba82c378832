"""Inference speed measured like mmdetection's benchmark: batch 1, warm-up first, GPU synchronised.

Two numbers, because they answer different questions: model-only FPS (pre-processing, forward and
post-processing of an image already in memory) is what a norm layer changes; end-to-end FPS adds
decoding and transforming the image, which is what a user of the detector waits for.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cbn_detect.runtime import synchronize
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.progress import ProgressSettings


@torch.no_grad()
def measure_fps(
    model: nn.Module, dataset: Dataset, device: torch.device, num_images: int, warmup: int,
    progress: ProgressSettings | None = None,
) -> dict[str, Any]:
    """``progress`` counts the images run (warm-up, model-only, end-to-end), outside the timed parts."""
    if num_images < 1:
        raise ConfigError(f"eval.fps_images={num_images} must be at least 1")
    was_training = model.training
    model.eval()
    count = len(dataset)
    indices = [i % count for i in range(warmup + num_images)]

    shown = (progress or ProgressSettings()).track("fps", warmup + 2 * num_images, unit="image")
    images = [dataset[i][0].as_subclass(torch.Tensor).to(device) for i in indices]
    for image in images[:warmup]:
        model([image])
        shown.update(1, phase="warm-up")
    model_time = 0.0
    for image in images[warmup:]:
        synchronize(device)
        start = time.perf_counter()
        model([image])
        synchronize(device)
        model_time += time.perf_counter() - start
        shown.update(1, images=1, phase="model")

    e2e_time = 0.0
    for i in indices[warmup:]:
        synchronize(device)
        start = time.perf_counter()
        image = dataset[i][0].as_subclass(torch.Tensor).to(device)
        model([image])
        synchronize(device)
        e2e_time += time.perf_counter() - start
        shown.update(1, images=1, phase="end-to-end")
    shown.close()
    model.train(was_training)
    sample = images[0]
    return {
        "fps_model": num_images / model_time,
        "fps_end_to_end": num_images / e2e_time,
        "images": num_images,
        "warmup": warmup,
        "batch": 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(sample.dtype).replace("torch.", ""),
        "input_size": list(sample.shape[-2:]),
    }
