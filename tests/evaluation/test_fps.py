"""Batch-1 FPS: the progress counts the timed images, and a disturbed timing is flagged."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from cbn_detect.evaluation.fps import measure_fps
from cbn_detect.runtime.progress import ProgressSettings


class CountingImages(Dataset):
    """Each load of an index returns a new tensor holding how often that index was loaded before:
    the model-only pass preloads every image once (value 0), the end-to-end pass loads it again."""

    def __init__(self, size: int) -> None:
        self.loads = [0] * size

    def __len__(self) -> int:
        return len(self.loads)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        value = self.loads[index]
        self.loads[index] += 1
        return torch.full((3, 8, 8), float(value)), {}


class SlowOnFirstLoads(nn.Module):
    """Sleeps on every first-loaded image: the model-only pass then looks slower than end-to-end,
    as when another process disturbs it."""

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        if images[0].max() == 0:
            time.sleep(0.02)
        return [{}]


class Steady(nn.Module):
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        time.sleep(0.002)
        return [{}]


def test_an_end_to_end_fps_above_the_model_only_one_is_flagged_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cbn_detect.fps"):
        fps = measure_fps(SlowOnFirstLoads(), CountingImages(4), torch.device("cpu"), num_images=4, warmup=0)
    assert fps["fps_end_to_end"] > 2 * fps["fps_model"]
    assert fps["consistent"] is False
    assert "FPS timing disturbed" in caplog.text and "python -m cbn_detect.evaluate" in caplog.text


def test_a_steady_timing_is_consistent_and_the_progress_counts_the_timed_images(
    caplog: pytest.LogCaptureFixture,
) -> None:
    progress = ProgressSettings(mode="lines", every_s=0.0)
    with caplog.at_level(logging.INFO):
        fps = measure_fps(Steady(), CountingImages(3), torch.device("cpu"), num_images=5, warmup=2, progress=progress)
    assert fps["consistent"] is True and fps["images"] == 5 and fps["input_size"] == [8, 8]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fps ")]
    assert [line.split(" ")[1] for line in lines] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert "FPS timing disturbed" not in caplog.text


def test_the_results_file_for_people_marks_a_disturbed_timing() -> None:
    from cbn_detect.results import Results, results_text

    fps = {"fps_model": 3.4, "fps_end_to_end": 47.3, "device": "cpu", "dtype": "float32", "consistent": False}
    run = dict(
        status="completed",
        model="retinanet_tiny",
        norm="bn",
        batch=4,
        world_size=1,
        total_batch=4,
        seed=0,
        data="synthetic",
    )
    assert "model 3.4  end-to-end 47.3  (disturbed: end-to-end above model-only" in results_text(
        Results(**run, fps=fps)
    )
    steady = results_text(Results(**run, fps={**fps, "consistent": True}))
    assert "disturbed" not in steady and "model 3.4  end-to-end 47.3" in steady
