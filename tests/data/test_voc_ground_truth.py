"""One ground-truth reader: the in-run evaluation and voc_eval score the same detection files
against the annotations as the official devkit reads them (nothing clipped, nothing dropped), while
training targets are still repaired.

Before the two shared one reader, the in-run path clipped ground-truth boxes to the image and
dropped empty ones, so a box reaching past the image edge gave the in-run evaluation a full-marks
match with the clipped detection that voc_eval (like the devkit) scored as a miss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cbn_detect.data import transforms
from cbn_detect.data.voc import VOCDataset
from cbn_detect.evaluation.devkit_io import read_ground_truth
from cbn_detect.evaluation.evaluator import evaluate
from cbn_detect.runtime import DistInfo
from cbn_detect.voc import VOC_CLASSES
from cbn_detect.voc_eval import main as voc_eval
from tests.helpers.voc_fixture import FixtureImage, FixtureObject, write_voc

# Images are 64 x 48. VOC boxes are 1-based inclusive; continuous xyxy = (xmin - 1, ymin - 1, ...).
IMAGES = (
    FixtureImage("000001", objects=[FixtureObject("dog", (1, 1, 30, 30))]),
    # Reaches 56 pixels past the right edge: (39, 9, 120, 30), clipped (39, 9, 64, 30).
    FixtureImage("000002", objects=[FixtureObject("car", (40, 10, 120, 30))]),
    # Lies wholly right of the image: no area left once clipped, so training drops it.
    FixtureImage("000003", objects=[FixtureObject("cat", (80, 10, 90, 20))]),
)
SPLIT = "test"


class Replay(nn.Module):
    """A detector stand-in that returns fixed detections, one image after the other."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = self.outputs[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


def detections(rows: list[tuple[int, float, tuple[float, float, float, float]]]) -> dict:
    """(label, score, continuous xyxy box) rows -> a torchvision-style detector output."""
    return {
        "boxes": torch.tensor([box for _, _, box in rows], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([score for _, score, _ in rows], dtype=torch.float32),
        "labels": torch.tensor([label for label, _, _ in rows], dtype=torch.int64),
    }


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    return write_voc(tmp_path, IMAGES, {SPLIT: [image.image_id for image in IMAGES]})


def label(name: str) -> int:
    return VOC_CLASSES.index(name) + 1


def test_in_run_map_equals_voc_eval_with_a_box_past_the_image_edge(voc: Path, tmp_path: Path) -> None:
    dataset = VOCDataset(voc, SPLIT, transforms=transforms.test_transforms())
    # What a detector outputs: boxes inside the image (torchvision clips them), here the dog
    # exactly and the car as far as it is visible.
    model = Replay(
        [
            detections([(label("dog"), 0.9, (0.0, 0.0, 30.0, 30.0))]),
            detections([(label("car"), 0.8, (39.0, 9.0, 64.0, 30.0))]),
            detections([]),
        ]
    )
    results = tmp_path / "results"
    in_run = evaluate(
        model,
        dataset,
        dataset.ground_truth(),
        VOC_CLASSES,
        torch.device("cpu"),
        DistInfo(),
        batch=1,
        workers=0,
        metrics=["voc07", "area"],
        coco=False,
        detections_dir=results,
        split=SPLIT,
    )
    assert in_run is not None

    for metric in ("voc07", "area"):
        out = tmp_path / f"voc_eval_{metric}.json"
        argv = ["--voc-dir", str(voc), "--split", SPLIT, "--results", str(results)]
        assert voc_eval([*argv, "--metric", metric, "--json", str(out)]) == 0
        scores = json.loads(out.read_text())
        assert in_run[f"map_{metric}"] == scores["mAP"]
        if metric == in_run["ap_metric"]:
            assert in_run["ap_per_class"] == scores["ap"]

    # As the devkit scores it: the clipped car overlaps the whole car 25 x 21 / 81 x 21 < 0.5, a
    # miss; the cat is a positive nothing can find. (Clipped ground truth said dog 1, car 1.)
    assert in_run["ap_per_class"]["dog"] == 1.0
    assert in_run["ap_per_class"]["car"] == 0.0 and in_run["ap_per_class"]["cat"] == 0.0
    assert in_run["map_voc07"] == pytest.approx(1 / 3)


def test_both_paths_read_the_same_ground_truth_and_training_targets_stay_repaired(
    voc: Path,
) -> None:
    dataset = VOCDataset(voc, SPLIT)
    in_run = dataset.ground_truth()
    devkit = read_ground_truth(voc, SPLIT, VOC_CLASSES)
    assert in_run.image_ids == devkit.image_ids == [image.image_id for image in IMAGES]
    for field in ("boxes", "labels", "difficult"):
        for ours, theirs in zip(getattr(in_run, field), getattr(devkit, field)):
            np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(in_run.boxes[1], [[39, 9, 120, 30]])
    np.testing.assert_array_equal(in_run.boxes[2], [[79, 9, 90, 20]])

    # Training targets: the car clipped to the image, the cat dropped, both counted.
    assert dataset[1][1]["boxes"].tolist() == [[39, 9, 64, 30]]
    assert dataset[2][1]["boxes"].shape == (0, 4) and dataset[2][1]["labels"].shape == (0,)
    assert dataset.problems.counts == {"box_clipped": 1, "box_dropped": 1}
