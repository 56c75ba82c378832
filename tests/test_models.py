"""The RetinaNet builder: torchvision's detector with per-level norms in the head."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from cbn_detect.models import build_detector, build_retinanet
from cbn_detect.models.backbone import ResNetTrunk
from cbn_detect.models.retinanet import PerLevelNormTower
from tests.conftest import CONF_DIR

TINY = dict(
    depth="resnet10",
    base_width=8,
    fpn_channels=16,
    returned_stages=(2, 3, 4),
    extra_levels="none",
    anchor_sizes=(16, 32, 64),
    head_convs=2,
    min_size=64,
    max_size=64,
)


def test_trunk_at_base_width_64_matches_torchvision_resnet50() -> None:
    from torchvision.models import resnet50

    ours = ResNetTrunk("resnet50", 64)
    theirs = resnet50(weights=None)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert ours_shapes == theirs_shapes


def test_head_has_one_norm_per_level_and_conv() -> None:
    model = build_retinanet(num_classes=3, **TINY)
    tower = model.head.classification_head.conv
    assert isinstance(tower, PerLevelNormTower)
    assert len(tower.norms) == 2 and all(len(per_level) == 3 for per_level in tower.norms)
    producers = tower.norm_producers()
    assert producers["norms.1.2"] is tower.conv[1]
    # The norms of different levels are distinct modules with their own statistics.
    assert tower.norms[0][0] is not tower.norms[0][1]


def test_each_level_updates_only_its_own_norm_statistics() -> None:
    model = build_retinanet(num_classes=3, **TINY).train()
    tower = model.head.regression_head.conv
    before = [n.running_mean.clone() for n in tower.norms[0]]
    tower(torch.randn(2, 16, 8, 8), level=1)
    after = [n.running_mean for n in tower.norms[0]]
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


def test_training_forward_gives_finite_focal_and_box_losses() -> None:
    torch.manual_seed(0)
    model = build_retinanet(num_classes=3, **TINY).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([3])} for _ in range(2)]
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_returns_boxes_in_the_original_image_frame() -> None:
    """A hand-set head that detects for sure: zero classification weights and bias +3 on class 2
    only (score sigmoid(3) at every anchor), zero box deltas (each box is its anchor). The 50 x 90
    image is resized to 36 x 64 inside the model; the boxes come back clipped to the 90 x 50 frame
    of the input, and the largest anchors reach its borders."""
    model = build_retinanet(num_classes=3, **TINY).eval()
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    with torch.no_grad():
        cls_head.cls_logits.weight.zero_()
        cls_head.cls_logits.bias.fill_(-10.0)
        cls_head.cls_logits.bias.view(-1, 4)[:, 2] = 3.0  # (A*K,) -> (A, K): class 2 of every anchor
        reg_head.bbox_reg.weight.zero_()
        reg_head.bbox_reg.bias.zero_()
        out = model([torch.rand(3, 50, 90)])[0]
    assert len(out["boxes"]) > 10 and out["boxes"].shape[1] == 4
    assert torch.equal(out["labels"], torch.full_like(out["labels"], 2))
    torch.testing.assert_close(out["scores"], torch.full_like(out["scores"], torch.sigmoid(torch.tensor(3.0)).item()))
    boxes = out["boxes"]
    assert boxes[:, :2].min() == 0.0 and boxes[:, 2].max() == 90.0 and boxes[:, 3].max() == 50.0
    # anchors over the padding below the image clip to empty boxes on its border, as torchvision's
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert boxes.max() <= 90.0 and boxes[:, 1::2].max() <= 50.0


def test_mismatched_anchor_sizes_name_the_setting() -> None:
    with pytest.raises(ValueError, match="model.anchor_sizes"):
        build_retinanet(num_classes=3, **{**TINY, "anchor_sizes": (16, 32)})


@pytest.mark.parametrize("name", ["retinanet_tiny", "retinanet_r18", "retinanet_r50"])
def test_every_model_config_instantiates(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    model = build_detector(cfg.model, num_classes=20)
    assert isinstance(model, nn.Module)
    assert model.head.classification_head.num_classes == 21
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 10
