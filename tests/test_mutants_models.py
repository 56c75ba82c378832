"""Detectors against torchvision's own modules with the same weights, where our docstrings claim
torchvision's behaviour: SSD's pre-processing (resize, ImageNet normalisation), default boxes,
matching, loss and post-processing. Kills `make mutate`'s surviving mutants of models/ssd.py."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from cbn_detect.models.ssd import ResNetFeatureMaps, build_ssd
from cbn_detect.norm import convert_norm

# Written out here, not imported: the values SSD300 and torchvision use.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# ResNet stages 2-4 give 3 maps at 300 px (38, 19, 10); these three make the 5, 3 and 1 px ones.
EXTRAS = [
    {"mid": 8, "out": 16, "kernel": 3, "stride": 2, "padding": 1},
    {"mid": 8, "out": 16, "kernel": 3, "stride": 1, "padding": 0},
    {"mid": 8, "out": 16, "kernel": 3, "stride": 1, "padding": 0},
]
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        ours.backbone, anchors, (300, 300), NUM_CLASSES + 1, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        head=head, score_thresh=0.01, nms_thresh=0.45, detections_per_img=200, iou_thresh=0.5,
        topk_candidates=400, positive_fraction=0.25,
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


IMAGES = [torch.rand(3, 120, 200, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 90, 70, generator=torch.Generator().manual_seed(2))]


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


# --- RetinaNet -----------------------------------------------------------------------------------

from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead  # noqa: E402

from cbn_detect.models import build_retinanet  # noqa: E402

# Non-default values everywhere, so that a setting our builder forgot to pass on shows.
RETINA = dict(
    depth="resnet10", base_width=8, fpn_channels=16, returned_stages=(2, 3, 4), head_convs=4,
    min_size=72, max_size=100, score_thresh=0.2, nms_thresh=0.3, detections_per_img=40, topk_candidates=60,
    fg_iou_thresh=0.45, bg_iou_thresh=0.35, prior_probability=0.2,
)


def retinanet_pair(extra_levels: str, anchor_sizes: tuple[int, ...]) -> tuple[nn.Module, RetinaNet]:
    """Our RetinaNet with no norm in its head, and torchvision's RetinaNet (its own head, which has
    4 shared convs with bias and no norm, its own per-image loss and post-processing) on the same
    backbone with our head's weights; anchors written out here: per level size * 2^(i/3), i < 3,
    at aspect ratios 0.5, 1, 2 (Lin et al. 2017)."""
    torch.manual_seed(0)
    ours = build_retinanet(NUM_CLASSES, extra_levels=extra_levels, anchor_sizes=anchor_sizes, **RETINA)
    # prior probability p: the classification bias starts at -log((1 - p) / p) (the paper's init)
    prior = ours.head.classification_head.cls_logits.bias
    torch.testing.assert_close(prior, torch.full_like(prior, -float(torch.log(torch.tensor(0.8 / 0.2)))))
    ours = convert_norm(ours, "none", where=["backbone", "fpn", "head"])
    anchors = AnchorGenerator(
        tuple(tuple(s * 2 ** (i / 3) for i in range(3)) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes)
    )
    head = RetinaNetHead(RETINA["fpn_channels"], 9, NUM_CLASSES + 1, norm_layer=None)
    theirs = RetinaNet(
        ours.backbone, NUM_CLASSES + 1, min_size=72, max_size=100, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        anchor_generator=anchors, head=head, score_thresh=0.2, nms_thresh=0.3, detections_per_img=40,
        fg_iou_thresh=0.45, bg_iou_thresh=0.35, topk_candidates=60,
    )
    with torch.no_grad():
        for name in ("classification_head", "regression_head"):
            our_head, their_head = getattr(ours.head, name), getattr(head, name)
            assert len(our_head.conv.conv) == len(their_head.conv) == 4
            for our_conv, their_block in zip(our_head.conv.conv, their_head.conv):
                # "none": each tower conv got a bias back (zero), its per-level norms are Identity
                assert our_conv.bias is not None and all(isinstance(n[0], nn.Identity) for n in [our_head.conv.norms[0]])
                their_block[0].weight.copy_(our_conv.weight)
                their_block[0].bias.copy_(our_conv.bias.normal_(std=0.1))
            last = "cls_logits" if name == "classification_head" else "bbox_reg"
            getattr(their_head, last).weight.copy_(getattr(our_head, last).weight.normal_(std=0.3))
            getattr(their_head, last).bias.copy_(getattr(our_head, last).bias.normal_())
    return ours, theirs


RETINA_IMAGES = [torch.rand(3, 50, 90, generator=torch.Generator().manual_seed(3)),
                 torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4))]


@pytest.mark.parametrize("extra_levels, anchor_sizes", [("p6p7", (8, 16, 32, 64, 128)), ("none", (16, 32, 64))])
def test_retinanet_with_no_norm_detects_and_learns_exactly_as_torchvisions(extra_levels, anchor_sizes) -> None:
    ours, theirs = retinanet_pair(extra_levels, anchor_sizes)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        got, expected = ours(RETINA_IMAGES), theirs(RETINA_IMAGES)
    for g, e, image in zip(got, expected, RETINA_IMAGES):
        assert 0 < len(e["boxes"]) <= 40  # real detections, cut at detections_per_img
        assert len(g["boxes"]) == len(e["boxes"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-5, atol=1e-6)
        assert torch.equal(g["labels"], e["labels"])
        height, width = image.shape[-2:]  # in the input image's frame, not the resized one
        assert g["boxes"][:, 2].max() <= width and g["boxes"][:, 3].max() <= height and g["scores"].min() > 0.2
    ours.train(), theirs.train()
    targets = [
        {"boxes": torch.tensor([[10.0, 5.0, 60.0, 45.0], [70.0, 10.0, 88.0, 30.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    got, expected = ours(RETINA_IMAGES, targets), theirs(RETINA_IMAGES, targets)
    assert set(got) == set(expected) == {"classification", "bbox_regression"}
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
        NUM_CLASSES, ResNetFeatureMaps("resnet10", 4), EXTRAS, size=96, head_convs=2, output_norm=False,
        image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.6, 0.7), score_thresh=0.2, nms_thresh=0.3,
        detections_per_img=17, topk_candidates=33, iou_thresh=0.6, positive_fraction=0.4,
    )
    assert model.transform.image_mean == [0.1, 0.2, 0.3] and model.transform.image_std == [0.5, 0.6, 0.7]
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (0.2, 0.3, 17, 33)
    assert isinstance(model.proposal_matcher, SSDMatcher) and model.proposal_matcher.high_threshold == 0.6
    assert model.neg_to_pos_ratio == pytest.approx((1 - 0.4) / 0.4)
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    block = model.head.classification_head.module_list[0]
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert block[-1].bias is not None and torch.equal(block[-1].bias, torch.zeros_like(block[-1].bias))
    with_norm = build_ssd(NUM_CLASSES, ResNetFeatureMaps("resnet10", 4), EXTRAS).head.regression_head.module_list[0]
    assert [type(m).__name__ for m in with_norm] == ["Conv2d", "BatchNorm2d"] and with_norm[0].bias is None
    defaults = build_ssd(NUM_CLASSES, ResNetFeatureMaps("resnet10", 4), EXTRAS)
    assert (defaults.topk_candidates, defaults.proposal_matcher.high_threshold, defaults.neg_to_pos_ratio) == (400, 0.5, 3.0)


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
        with pytest.raises(ConfigError, match="^" + re.escape(f"model.trunk.returned_stages={stages} must be increasing stage numbers in 1..4") + "$"):
            ResNetFeatureMaps("resnet10", 4, stages)


def test_retinanet_head_towers_start_as_the_papers_and_declare_their_producers() -> None:
    """Lin et al. 2017 initialise the head convs from N(0, 0.01^2) (sample std of 2304 weights
    within 10%); every per-level norm names the shared conv before it."""
    from cbn_detect.models.retinanet import PerLevelNormTower

    torch.manual_seed(0)
    tower = PerLevelNormTower(16, num_convs=3, num_levels=2)
    for conv in tower.conv:
        assert conv.bias is None and abs(float(conv.weight.detach().std()) - 0.01) < 1e-3
    assert tower.norm_producers() == {f"norms.{i}.{level}": tower.conv[i] for i in range(3) for level in range(2)}
    assert all(isinstance(n, nn.BatchNorm2d) for per_level in tower.norms for n in per_level)
    x = torch.randn(2, 16, 5, 5)
    expected = x
    for i in range(3):
        expected = torch.relu(tower.norms[i][1](tower.conv[i](expected)))
    torch.testing.assert_close(tower(x, level=1), expected)


def test_build_retinanet_defaults_are_the_papers_model() -> None:
    """The builder's defaults: the study's base config (conf/model/base/retinanet.yaml, read with
    yaml) for the network, torchvision's RetinaNet for image size and matching thresholds (the
    config picks a smaller image size), the paper's prior 0.01 for the classification bias."""
    import inspect

    import yaml

    from cbn_detect.models.retinanet import ClassificationHead
    from tests.conftest import CONF_DIR

    ours = {k: p.default for k, p in inspect.signature(build_retinanet).parameters.items() if k != "num_classes"}
    # the signature, and what a call with no options builds (what a wrapper could not fake)
    torch.manual_seed(0)
    built = build_retinanet(NUM_CLASSES)
    assert (built.transform.min_size, built.transform.max_size) == ((800,), 1333)
    assert (built.score_thresh, built.nms_thresh, built.detections_per_img, built.topk_candidates) == (0.05, 0.5, 100, 1000)
    assert (built.proposal_matcher.high_threshold, built.proposal_matcher.low_threshold) == (0.5, 0.4)
    assert built.backbone.out_channels == 256 and len(built.anchor_generator.sizes) == 5
    assert built.anchor_generator.sizes[0][0] == 32 and built.anchor_generator.sizes[-1][0] == 512
    assert len(built.head.classification_head.conv.conv) == 4 and len(built.backbone.body.layer3) == 6
    assert built.backbone.body.conv1.out_channels == 64
    conf = yaml.safe_load((CONF_DIR / "model" / "base" / "retinanet.yaml").read_text())
    theirs = {k: p.default for k, p in inspect.signature(RetinaNet.__init__).parameters.items()}
    for key in ("depth", "base_width", "fpn_channels", "extra_levels", "head_convs", "score_thresh", "nms_thresh",
                "detections_per_img", "topk_candidates"):
        assert ours[key] == conf[key], key
    assert list(ours["returned_stages"]) == conf["returned_stages"] and list(ours["anchor_sizes"]) == conf["anchor_sizes"]
    for key in ("min_size", "max_size", "fg_iou_thresh", "bg_iou_thresh"):
        assert ours[key] == theirs[key], key
    assert ours["prior_probability"] == 0.01
    head = ClassificationHead(8, 9, 4, num_convs=1, num_levels=1)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((36,), -float(torch.log(torch.tensor(99.0)))))


def test_batched_losses_apply_only_to_torchvisions_own_rules() -> None:
    """The batch-wide loss applies to torchvision's matcher, heads and l1 / smooth_l1 box losses;
    anything else (a matcher or head subclass, another box loss) keeps torchvision's per-image code."""
    from torchvision.models.detection._utils import Matcher

    from cbn_detect.models.retinanet import RetinaNetDetector

    def tiny():
        torch.manual_seed(0)
        return build_retinanet(NUM_CLASSES, depth="resnet10", base_width=4, fpn_channels=8, extra_levels="none",
                               anchor_sizes=(16, 32, 64), head_convs=1, min_size=64, max_size=64)

    model = tiny()
    assert model._batched_loss_applies()
    model.head.regression_head._loss_type = "smooth_l1"
    assert model._batched_loss_applies()
    model.head.regression_head._loss_type = "giou"
    assert not model._batched_loss_applies()

    class MyMatcher(Matcher):
        pass

    model = tiny()
    model.proposal_matcher = MyMatcher(0.5, 0.4, allow_low_quality_matches=True)
    assert not model._batched_loss_applies()
    for part in ("head", "classification_head", "regression_head"):
        model = tiny()
        owner = model if part == "head" else model.head
        module = getattr(owner, part)
        subclass = type("Custom", (type(module),), {"compute_loss": lambda self, *a: None})
        module.__class__ = subclass
        assert not model._batched_loss_applies(), part
    assert isinstance(tiny(), RetinaNetDetector)


def test_a_one_level_retinanet_builds_and_detects() -> None:
    torch.manual_seed(0)
    model = build_retinanet(NUM_CLASSES, depth="resnet10", base_width=4, fpn_channels=8, returned_stages=(4,),
                            extra_levels="none", anchor_sizes=(32,), head_convs=1, min_size=64, max_size=64).eval()
    assert model.head.classification_head.cls_logits.out_channels == 9 * (NUM_CLASSES + 1)
    with torch.no_grad():
        assert model([torch.rand(3, 64, 64)])[0]["boxes"].shape[1] == 4
