"""Run a detector over a test split and score it: VOC AP (both protocols), COCO AP, devkit files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cbn_detect.data.build import test_loader
from cbn_detect.evaluation.coco_metrics import evaluate_coco
from cbn_detect.evaluation.devkit_io import write_detections
from cbn_detect.evaluation.voc_ap import evaluate_voc
from cbn_detect.runtime import DistInfo, gather_objects
from cbn_detect.runtime.progress import ProgressSettings
from cbn_detect.voc import Detections, GroundTruth


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    progress: ProgressSettings | None = None,
    what: str = "eval",
) -> Detections:
    """Detections for every image of the loader, in its (unshuffled) order, in image coordinates.
    ``progress``: a bar or a line every few seconds as the images go by (None: nothing)."""
    was_training = model.training
    model.eval()
    image_ids: list[str] = []
    boxes: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    shown = (progress or ProgressSettings()).track(what, len(loader.dataset), unit="image")
    for images, targets in loader:
        outputs = model([image.to(device, non_blocking=True) for image in images])
        shown.update(len(images), images=len(images))
        for target, output in zip(targets, outputs):
            # Label 0 is background: SSD never emits it, and RetinaNet's never-trained logit 0
            # (torchvision's one-hot focal loss) can only pass a very low score_thresh.
            keep = (output["labels"] > 0).cpu()
            image_ids.append(str(target["image_id"]))
            boxes.append(output["boxes"].detach().cpu()[keep].double().numpy().reshape(-1, 4))
            scores.append(output["scores"].detach().cpu()[keep].double().numpy())
            labels.append(output["labels"].detach().cpu()[keep].numpy().astype(np.int64))
    shown.close()
    model.train(was_training)
    return Detections(image_ids=image_ids, boxes=boxes, scores=scores, labels=labels)


def _merge_shards(shards: Sequence[tuple[list[int], Detections]]) -> Detections:
    """Reassemble per-process detections into dataset order (shard r holds indices r, r+W, ...)."""
    by_index: dict[int, tuple[str, np.ndarray, np.ndarray, np.ndarray]] = {}
    for indices, dets in shards:
        for j, index in enumerate(indices):
            by_index[index] = (dets.image_ids[j], dets.boxes[j], dets.scores[j], dets.labels[j])
    ordered = [by_index[i] for i in sorted(by_index)]
    return Detections(
        image_ids=[o[0] for o in ordered],
        boxes=[o[1] for o in ordered],
        scores=[o[2] for o in ordered],
        labels=[o[3] for o in ordered],
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    gt: GroundTruth,
    class_names: Sequence[str],
    device: torch.device,
    info: DistInfo,
    *,
    batch: int,
    workers: int,
    metrics: Sequence[str],
    coco: bool,
    detections_dir: Path | None,
    split: str,
    progress: ProgressSettings | None = None,
) -> dict[str, Any] | None:
    """Scores keyed ``map_<metric>``, ``ap_per_class`` (first metric, by class) and ``coco``.

    Each process predicts its shard of the test set; rank 0 gathers them back into dataset order
    and scores the whole split, so the numbers equal a single-process evaluation. Other ranks get
    None. ``model`` must be the bare network, not its DDP wrapper: shards may differ in length,
    and DDP's per-forward buffer broadcast would then wait forever. ``progress`` shows this
    process's shard (only the main process reports).
    """
    indices = list(range(info.rank, len(dataset), info.world_size))
    loader = test_loader(Subset(dataset, indices), batch, workers)
    what = "eval" if info.world_size == 1 else f"eval (shard 1 of {info.world_size})"
    shards = gather_objects((indices, predict(model, loader, device, progress, what)), info)
    if not info.is_main:
        return None
    dets = _merge_shards(shards)
    if dets.image_ids != gt.image_ids:
        raise RuntimeError("the test loader's image order differs from the ground truth's")
    if detections_dir is not None:
        write_detections(dets, class_names, detections_dir, split)
    scores: dict[str, Any] = {}
    for i, metric in enumerate(metrics):
        result = evaluate_voc(gt, dets, class_names, metric=metric)
        scores[f"map_{metric}"] = float(result.map)
        if i == 0:
            scores["ap_per_class"] = dict(result.ap)
            scores["ap_metric"] = metric
    if coco:
        scores["coco"] = evaluate_coco(gt, dets, class_names)
    scores["num_detections"] = int(sum(len(s) for s in dets.scores))
    return scores
