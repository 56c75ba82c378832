"""Inference speed measured like mmdetection's benchmark: batch 1, warm-up first, GPU synchronised.

Two numbers, because they answer different questions: model-only FPS (pre-processing, forward and
post-processing of an image already in memory) is what a norm layer changes; end-to-end FPS adds
decoding and transforming the image, which is what a user of the detector waits for.

The two are timed image by image, interleaved (model-only then end-to-end for one image, the order
swapped on every other image), not as two passes one after the other: a disturbance (another
process of the job shutting down, a W&B flush, another job on the machine) then slows both alike
instead of only the pass it happens to fall into. End-to-end does strictly more work than
model-only, so an end-to-end FPS clearly above the model-only one can only come from such a
disturbance; it is logged as a warning and recorded (``consistent: false``) rather than reported as
if it were a measurement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cbn_detect.runtime import synchronize
from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.progress import ProgressSettings

log = logging.getLogger("cbn_detect.fps")

CONSISTENCY_MARGIN = 1.1
"""End-to-end FPS above model-only FPS by more than this factor is a disturbed timing: with the image
loading as the only difference, timer resolution and cache effects stay within a few percent."""


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_fps(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    num_images: int,
    warmup: int,
    progress: ProgressSettings | None = None,
) -> dict[str, Any]:
    """Batch-1 FPS over ``num_images`` images after ``warmup`` untimed ones. ``progress`` counts the
    timed images (each run twice: model-only and end-to-end), outside the timed parts."""
    if num_images < 1:
        raise ConfigError(f"eval.fps_images={num_images} must be at least 1")
    was_training = model.training
    model.eval()
    count = len(dataset)
    indices = [i % count for i in range(warmup + num_images)]

    def load(i: int) -> torch.Tensor:
        return dataset[i][0].as_subclass(torch.Tensor).to(device)

    def run_loaded(i: int) -> object:
        return model([load(i)])

    for i in indices[:warmup]:
        model([load(i)])
    shown = (progress or ProgressSettings()).track("fps", num_images, unit="image")
    seconds = {"model": 0.0, "end_to_end": 0.0}
    sample = None
    for n, i in enumerate(indices[warmup:]):
        image = load(i)  # the model-only pass's input, already in memory
        sample = image if sample is None else sample
        passes = [("model", partial(model, [image])), ("end_to_end", partial(run_loaded, i))]
        for name, work in passes if n % 2 == 0 else reversed(passes):
            seconds[name] += _timed(device, work)
        shown.update(1, images=1)
    shown.close()
    model.train(was_training)
    fps_model, fps_e2e = num_images / seconds["model"], num_images / seconds["end_to_end"]
    consistent = fps_e2e <= CONSISTENCY_MARGIN * fps_model
    if not consistent:
        log.warning(
            "FPS timing disturbed: end-to-end %.1f FPS above model-only %.1f FPS, although end-to-end does more "
            "work; another process was busy during the measurement. Time it again on a quiet machine "
            "(python -m cbn_detect.evaluate RUN_DIR) before quoting either number",
            fps_e2e,
            fps_model,
        )
    return {
        "fps_model": fps_model,
        "fps_end_to_end": fps_e2e,
        "consistent": consistent,
        "images": num_images,
        "warmup": warmup,
        "batch": 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(sample.dtype).replace("torch.", ""),
        "input_size": list(sample.shape[-2:]),
    }
