"""SSD from scratch: default boxes of SSD300/SSD512, norm placement, a training step per norm, a tiny run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead

from cbn_detect.data.build import class_names
from cbn_detect.engine.optim import scaled_lr
from cbn_detect.models import build_detector
from cbn_detect.models.ssd import ResNetFeatureMaps, build_ssd
from cbn_detect.norm import NORM_NAMES, convert_norm, norm_options
from tests.conftest import CONF_DIR, TINY_RUN
from tests.models.conftest import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES

# ResNet stages 2-4 already give SSD300's 38, 19 and 10 px maps; these make the 5, 3 and 1 px ones.
SSD300_EXTRAS_AFTER_RESNET = [
    {"mid": 256, "out": 512, "kernel": 3, "stride": 2, "padding": 1},
    {"mid": 128, "out": 256, "kernel": 3, "stride": 1, "padding": 0},
    {"mid": 128, "out": 256, "kernel": 3, "stride": 1, "padding": 0},
]


pytestmark = pytest.mark.usefixtures("single_thread")


def model_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"model={name}", *overrides]).model


def default_boxes_per_map(model: nn.Module, size: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(map sizes, default boxes per map, all boxes in pixels) for one size x size image."""
    images = torch.rand(1, 3, size, size)
    with torch.no_grad():
        maps = list(model.eval().backbone(images).values())
    boxes = model.anchor_generator(ImageList(images, [(size, size)]), maps)[0]
    per_location = model.anchor_generator.num_anchors_per_location()
    sides = [m.shape[-1] for m in maps]
    assert [m.shape[-2] for m in maps] == sides
    return sides, [s * s * a for s, a in zip(sides, per_location)], boxes


@pytest.mark.parametrize(
    "name, size, sides, total",
    [
        # 8,732 and 24,564: the default boxes of VGG16 SSD300 and SSD512 (Liu et al. 2016); 8,732 is also
        # what torchvision's ssd300_vgg16 generates.
        ("ssd300", 300, [38, 19, 10, 5, 3, 1], 8732),
        ("ssd512", 512, [64, 32, 16, 8, 4, 2, 1], 24564),
    ],
)
def test_vgg_ssd_has_the_papers_maps_and_default_boxes(name: str, size: int, sides: list[int], total: int) -> None:
    # Map sizes do not depend on the width; a narrow trunk keeps the 300/512 px forward cheap.
    model = build_detector(model_cfg(name, "model.trunk.base_width=4"), num_classes=20)
    got_sides, per_map, boxes = default_boxes_per_map(model, size)
    assert got_sides == sides
    assert sum(per_map) == len(boxes) == total
    # The first default box is the square of the smallest scale, centred on the first 8 px cell.
    half = float(model_cfg(name).scales[0]) * size / 2
    assert torch.allclose(boxes[0], torch.tensor([4 - half, 4 - half, 4 + half, 4 + half]))


def test_resnet_ssd300_gives_ssd300_maps_with_one_extra_layer_fewer() -> None:
    model = build_ssd(num_classes=20, trunk=ResNetFeatureMaps("resnet18", 4), extras=SSD300_EXTRAS_AFTER_RESNET)
    sides, per_map, _ = default_boxes_per_map(model, 300)
    assert sides == [38, 19, 10, 5, 3, 1] and sum(per_map) == 8732


@pytest.mark.parametrize("name", ["ssd300", "ssd512", "ssd_tiny"])
def test_every_ssd_config_builds_with_a_norm_after_every_conv_but_the_predictors(name: str) -> None:
    model = build_detector(model_cfg(name), num_classes=20)
    assert model.head.classification_head.num_columns == 21
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(convs) and all(c.bias is None for c in convs)


def test_norm_where_backbone_leaves_the_head_without_norms_and_gives_its_convs_biases() -> None:
    model = convert_norm(build_detector(model_cfg("ssd_tiny"), num_classes=3), "bn", where=["backbone"])
    head_norms = [n for n, m in model.head.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert head_norms == []
    assert all(m.bias is not None for m in model.head.modules() if isinstance(m, nn.Conv2d))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.extras.modules())
    assert all(m.bias is None for m in model.backbone.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_two_training_steps_give_finite_losses_with_every_norm(norm: str) -> None:
    torch.manual_seed(0)
    # burnin=0 makes CBN use (and compensate) its history from the second step on.
    options = {"burnin": 0} if "burnin" in norm_options(norm) else {}
    model = build_detector(model_cfg("ssd_tiny", "model.size=64"), num_classes=3)
    model = convert_norm(model, norm, where=["backbone", "head"], **options).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])} for _ in range(2)]
    first_conv = model.backbone.trunk.body.conv1.weight.detach().clone()
    for _ in range(2):
        losses = model(images, targets)
        assert set(losses) == {"classification", "bbox_regression"}
        assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert not torch.equal(first_conv, model.backbone.trunk.body.conv1.weight)


def test_inference_returns_labelled_boxes_in_the_original_image_frame() -> None:
    torch.manual_seed(0)
    model = build_detector(model_cfg("ssd_tiny", "model.size=64"), num_classes=3).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 90)])[0]
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) > 0
    assert out["boxes"][:, 2].max() <= 90 and out["boxes"][:, 3].max() <= 50
    assert out["labels"].min() >= 1 and out["labels"].max() <= 3


def test_mismatched_aspect_ratios_name_the_setting() -> None:
    with pytest.raises(ValueError, match="model.aspect_ratios"):
        build_ssd(num_classes=3, trunk=ResNetFeatureMaps("resnet10", 4), extras=[], aspect_ratios=[[2], [2]])


def test_the_voc07_ssd300_experiment_is_scratchdets_recipe_on_ssd300() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=voc07_ssd300", "norm=cbn"])
    assert (cfg.model.name, cfg.data.name, cfg.norm.name) == ("ssd300", "voc07", "cbn")
    assert scaled_lr(cfg.optim, total_batch=128) == pytest.approx(0.05)
    assert scaled_lr(cfg.optim, total_batch=cfg.data.batch) == pytest.approx(0.0125)
    assert list(cfg.optim.schedule.milestones) == [0.4, 0.75, 0.9]


def test_a_tiny_ssd_run_writes_results(tmp_path: Path) -> None:
    from cbn_detect.train import run

    # ssd_tiny has one input size instead of RetinaNet's min_size/max_size.
    overrides = [o for o in TINY_RUN if not o.startswith(("model.min_size", "model.max_size"))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "model=ssd_tiny", "model.size=64"])
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["model"] == "ssd_tiny"
    assert results["steps"] == 2 * (16 // 4)
    # values that could be wrong, recomputed another way: the mAP by test_voc_ap's plain-loop
    # devkit reference on the run's detection files and the test split's XML; the loss variance by
    # numpy on the last epoch's losses in metrics.jsonl
    from tests.engine.test_train import _devkit_inputs
    from tests.helpers.voc_reference import reference_ap

    names = class_names(cfg.data)
    gt, dets = _devkit_inputs(tmp_path / "detections", cfg.data, names)
    assert sum(len(d) for d in dets) > 0  # SSD's score threshold 0.01 lets the barely trained model detect
    expected_ap = reference_ap(gt, dets, len(names), "voc07")
    scored = [ap for ap in expected_ap.values() if ap is not None]
    assert results["map_voc07"] == pytest.approx(sum(scored) / len(scored), rel=1e-9, abs=1e-12)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [r["loss"] for r in records if "loss" in r and r.get("epoch") == 2]
    assert len(last_epoch) == 4 and results["loss_variance"] == pytest.approx(float(np.var(last_epoch)), rel=1e-9)


def test_the_resnet50_ssd300_has_ssd300s_maps_and_default_boxes() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=ssd300_r50"])
    model = build_detector(cfg.model, num_classes=20).eval()
    with torch.no_grad():
        features = list(model.backbone(torch.zeros(1, 3, 300, 300)).values())
    assert [tuple(f.shape[-2:]) for f in features] == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    anchors = model.anchor_generator(ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)]), features)
    assert anchors[0].shape == (8732, 4)


# ResNet stages 2-4 give 3 maps at 300 px (38, 19, 10); these three make the 5, 3 and 1 px ones.
EXTRAS = [
    {"mid": 8, "out": 16, "kernel": 3, "stride": 2, "padding": 1},
    {"mid": 8, "out": 16, "kernel": 3, "stride": 1, "padding": 0},
    {"mid": 8, "out": 16, "kernel": 3, "stride": 1, "padding": 0},
]


def torchvision_ssd_like(ours: nn.Module) -> SSD:
    """torchvision's SSD300 recipe (Liu et al. 2016: VOC default boxes, 3:1 hard negatives,
    IoU 0.5 matching, ImageNet normalisation, score 0.01 / NMS 0.45 / top 200 of 400) on our
    backbone, with a plain torchvision SSDHead holding our predictors' weights."""
    anchors = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    channels = [8, 16, 32, 16, 16, 16]  # resnet10 (basic blocks) at width 4: stages 2-4 give 8, 16, 32
    head = SSDHead(channels, anchors.num_anchors_per_location(), NUM_CLASSES + 1)
    theirs = SSD(
        ours.backbone,
        anchors,
        (300, 300),
        NUM_CLASSES + 1,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        head=head,
        score_thresh=0.01,
        nms_thresh=0.45,
        detections_per_img=200,
        iou_thresh=0.5,
        topk_candidates=400,
        positive_fraction=0.25,
    )
    with torch.no_grad():
        for name in ("classification_head", "regression_head"):
            for theirs_conv, our_block in zip(getattr(head, name).module_list, getattr(ours.head, name).module_list):
                # with the norm "none" each of our predictor blocks is (conv with bias, Identity)
                assert isinstance(our_block[1], nn.Identity) and our_block[0].bias is not None
                theirs_conv.weight.copy_(our_block[0].weight)
                theirs_conv.bias.copy_(our_block[0].bias.normal_())  # a non-zero bias, on both
    return theirs


@pytest.fixture(scope="module")
def ssd_pair() -> tuple[nn.Module, SSD]:
    torch.manual_seed(0)
    ours = build_ssd(NUM_CLASSES, ResNetFeatureMaps("resnet10", 4), EXTRAS)
    ours = convert_norm(ours, "none", where=["backbone", "head"])
    return ours, torchvision_ssd_like(ours)


IMAGES = [
    torch.rand(3, 120, 200, generator=torch.Generator().manual_seed(1)),
    torch.rand(3, 90, 70, generator=torch.Generator().manual_seed(2)),
]


def test_ssd_with_no_norm_detects_exactly_as_torchvisions_ssd(ssd_pair) -> None:
    ours, theirs = ssd_pair
    ours.eval(), theirs.eval()
    with torch.no_grad():
        got, expected = ours(IMAGES), theirs(IMAGES)
    for g, e, image in zip(got, expected, IMAGES):
        assert len(e["boxes"]) > 0  # the comparison is about real detections
        assert len(g["boxes"]) == len(e["boxes"]) <= 200
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-5, atol=1e-6)
        assert torch.equal(g["labels"], e["labels"])
        # in the input image's frame, labels 1..num_classes
        height, width = image.shape[-2:]
        assert g["boxes"][:, 2].max() <= width and g["boxes"][:, 3].max() <= height
        assert g["labels"].min() >= 1 and g["labels"].max() <= NUM_CLASSES and g["scores"].min() > 0.01


def test_ssd_with_no_norm_has_torchvisions_training_losses(ssd_pair) -> None:
    ours, theirs = ssd_pair
    ours.train(), theirs.train()
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0], [120.0, 5.0, 190.0, 60.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 80.0]]), "labels": torch.tensor([2])},
    ]
    got, expected = ours(IMAGES, targets), theirs(IMAGES, targets)
    assert set(got) == set(expected) == {"bbox_regression", "classification"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


# --- builders pass every setting on ------------------------------------------------------------------


def test_build_ssd_passes_every_setting_to_torchvisions_ssd() -> None:
    """Non-default values, read back where torchvision's SSD keeps them; the predictors: a tower
    of ``head_convs`` conv-norm-ReLU blocks, then a 3x3 conv with a zero bias exactly when it has
    no output norm."""
    from torchvision.models.detection._utils import SSDMatcher

    torch.manual_seed(0)
    model = build_ssd(
        NUM_CLASSES,
        ResNetFeatureMaps("resnet10", 4),
        EXTRAS,
        size=96,
        head_convs=2,
        output_norm=False,
        image_mean=(0.1, 0.2, 0.3),
        image_std=(0.5, 0.6, 0.7),
        score_thresh=0.2,
        nms_thresh=0.3,
        detections_per_img=17,
        topk_candidates=33,
        iou_thresh=0.6,
        positive_fraction=0.4,
    )
    assert model.transform.image_mean == [0.1, 0.2, 0.3] and model.transform.image_std == [0.5, 0.6, 0.7]
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (0.2, 0.3, 17, 33)
    assert isinstance(model.proposal_matcher, SSDMatcher) and model.proposal_matcher.high_threshold == 0.6
    assert model.neg_to_pos_ratio == pytest.approx((1 - 0.4) / 0.4)
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    block = model.head.classification_head.module_list[0]
    assert [type(m).__name__ for m in block] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
    ]
    assert block[-1].bias is not None and torch.equal(block[-1].bias, torch.zeros_like(block[-1].bias))
    with_norm = build_ssd(NUM_CLASSES, ResNetFeatureMaps("resnet10", 4), EXTRAS).head.regression_head.module_list[0]
    assert [type(m).__name__ for m in with_norm] == ["Conv2d", "BatchNorm2d"] and with_norm[0].bias is None
    defaults = build_ssd(NUM_CLASSES, ResNetFeatureMaps("resnet10", 4), EXTRAS)
    assert (defaults.topk_candidates, defaults.proposal_matcher.high_threshold, defaults.neg_to_pos_ratio) == (
        400,
        0.5,
        3.0,
    )


def test_ssd_settings_that_do_not_fit_are_named() -> None:
    from cbn_detect.runtime.errors import ConfigError

    trunk = ResNetFeatureMaps("resnet10", 4)
    with pytest.raises(ConfigError, match=r"^model.scales needs 7 entries \(one per map plus the last\), got 6$"):
        build_ssd(NUM_CLASSES, trunk, EXTRAS, scales=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    with pytest.raises(ConfigError, match=r"^model.steps needs 6 entries \(one per map\), got 5$"):
        build_ssd(NUM_CLASSES, trunk, EXTRAS, steps=(8, 16, 32, 64, 100))
    build_ssd(NUM_CLASSES, trunk, EXTRAS, scales=None, steps=None)  # both optional


def test_resnet_feature_maps_defaults_and_stage_checks() -> None:
    from cbn_detect.runtime.errors import ConfigError

    assert ResNetFeatureMaps().out_channels == [512, 1024, 2048]  # ResNet-50 at base width 64, stages 2-4
    assert ResNetFeatureMaps("resnet10", 4, (1, 4)).out_channels == [4, 32]
    for stages in ([], [3, 2], [2, 2], [0, 2], [2, 5], [2, 3, 5]):
        with pytest.raises(
            ConfigError,
            match="^"
            + re.escape(f"model.trunk.returned_stages={stages} must be increasing stage numbers in 1..4")
            + "$",
        ):
            ResNetFeatureMaps("resnet10", 4, stages)
