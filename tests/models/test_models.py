"""The RetinaNet builder: torchvision's detector with per-level norms in the head."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from cbn_detect.models import build_detector, build_retinanet
from cbn_detect.models.backbone import ResNetTrunk
from cbn_detect.models.retinanet import PerLevelNormTower
from cbn_detect.norm import convert_norm
from tests.conftest import CONF_DIR
from tests.models.conftest import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES

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


# Non-default values everywhere, so that a setting our builder forgot to pass on shows.
RETINA = dict(
    depth="resnet10",
    base_width=8,
    fpn_channels=16,
    returned_stages=(2, 3, 4),
    head_convs=4,
    min_size=72,
    max_size=100,
    score_thresh=0.2,
    nms_thresh=0.3,
    detections_per_img=40,
    topk_candidates=60,
    fg_iou_thresh=0.45,
    bg_iou_thresh=0.35,
    prior_probability=0.2,
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
        ours.backbone,
        NUM_CLASSES + 1,
        min_size=72,
        max_size=100,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        anchor_generator=anchors,
        head=head,
        score_thresh=0.2,
        nms_thresh=0.3,
        detections_per_img=40,
        fg_iou_thresh=0.45,
        bg_iou_thresh=0.35,
        topk_candidates=60,
    )
    with torch.no_grad():
        for name in ("classification_head", "regression_head"):
            our_head, their_head = getattr(ours.head, name), getattr(head, name)
            assert len(our_head.conv.conv) == len(their_head.conv) == 4
            for our_conv, their_block in zip(our_head.conv.conv, their_head.conv):
                # "none": each tower conv got a bias back (zero), its per-level norms are Identity
                assert our_conv.bias is not None and all(
                    isinstance(n[0], nn.Identity) for n in [our_head.conv.norms[0]]
                )
                their_block[0].weight.copy_(our_conv.weight)
                their_block[0].bias.copy_(our_conv.bias.normal_(std=0.1))
            last = "cls_logits" if name == "classification_head" else "bbox_reg"
            getattr(their_head, last).weight.copy_(getattr(our_head, last).weight.normal_(std=0.3))
            getattr(their_head, last).bias.copy_(getattr(our_head, last).bias.normal_())
    return ours, theirs


RETINA_IMAGES = [
    torch.rand(3, 50, 90, generator=torch.Generator().manual_seed(3)),
    torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4)),
]


@pytest.mark.parametrize("extra_levels, anchor_sizes", [("p6p7", (8, 16, 32, 64, 128)), ("none", (16, 32, 64))])
@pytest.mark.usefixtures("single_thread")
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


@pytest.mark.usefixtures("single_thread")
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


@pytest.mark.usefixtures("single_thread")
def test_build_retinanet_defaults_are_the_papers_model() -> None:
    """The builder's defaults: the study's base config (conf/model/base/retinanet.yaml, read with
    yaml) for the network and the image size, torchvision's RetinaNet for the matching thresholds,
    the paper's prior 0.01 for the classification bias."""
    import inspect

    import yaml

    from cbn_detect.models.retinanet import ClassificationHead
    from tests.conftest import CONF_DIR

    ours = {k: p.default for k, p in inspect.signature(build_retinanet).parameters.items() if k != "num_classes"}
    # the signature, and what a call with no options builds (what a wrapper could not fake)
    torch.manual_seed(0)
    built = build_retinanet(NUM_CLASSES)
    assert (built.transform.min_size, built.transform.max_size) == ((600,), 1000)
    assert (built.score_thresh, built.nms_thresh, built.detections_per_img, built.topk_candidates) == (
        0.05,
        0.5,
        100,
        1000,
    )
    assert (built.proposal_matcher.high_threshold, built.proposal_matcher.low_threshold) == (0.5, 0.4)
    assert built.backbone.out_channels == 256 and len(built.anchor_generator.sizes) == 5
    assert built.anchor_generator.sizes[0][0] == 32 and built.anchor_generator.sizes[-1][0] == 512
    assert len(built.head.classification_head.conv.conv) == 4 and len(built.backbone.body.layer3) == 6
    assert built.backbone.body.conv1.out_channels == 64
    conf = yaml.safe_load((CONF_DIR / "model" / "base" / "retinanet.yaml").read_text())
    theirs = {k: p.default for k, p in inspect.signature(RetinaNet.__init__).parameters.items()}
    for key in (
        "depth",
        "base_width",
        "fpn_channels",
        "extra_levels",
        "head_convs",
        "min_size",
        "max_size",
        "score_thresh",
        "nms_thresh",
        "detections_per_img",
        "topk_candidates",
    ):
        assert ours[key] == conf[key], key
    assert (
        list(ours["returned_stages"]) == conf["returned_stages"] and list(ours["anchor_sizes"]) == conf["anchor_sizes"]
    )
    for key in ("fg_iou_thresh", "bg_iou_thresh"):
        assert ours[key] == theirs[key], key
    assert ours["prior_probability"] == 0.01
    head = ClassificationHead(8, 9, 4, num_convs=1, num_levels=1)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((36,), -float(torch.log(torch.tensor(99.0)))))


@pytest.mark.usefixtures("single_thread")
def test_batched_losses_apply_only_to_torchvisions_own_rules() -> None:
    """The batch-wide loss applies to torchvision's matcher, heads and l1 / smooth_l1 box losses;
    anything else (a matcher or head subclass, another box loss) keeps torchvision's per-image code."""
    from torchvision.models.detection._utils import Matcher

    from cbn_detect.models.retinanet import RetinaNetDetector

    def tiny():
        torch.manual_seed(0)
        return build_retinanet(
            NUM_CLASSES,
            depth="resnet10",
            base_width=4,
            fpn_channels=8,
            extra_levels="none",
            anchor_sizes=(16, 32, 64),
            head_convs=1,
            min_size=64,
            max_size=64,
        )

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


@pytest.mark.usefixtures("single_thread")
def test_a_one_level_retinanet_builds_and_detects() -> None:
    torch.manual_seed(0)
    model = build_retinanet(
        NUM_CLASSES,
        depth="resnet10",
        base_width=4,
        fpn_channels=8,
        returned_stages=(4,),
        extra_levels="none",
        anchor_sizes=(32,),
        head_convs=1,
        min_size=64,
        max_size=64,
    ).eval()
    assert model.head.classification_head.cls_logits.out_channels == 9 * (NUM_CLASSES + 1)
    with torch.no_grad():
        assert model([torch.rand(3, 64, 64)])[0]["boxes"].shape[1] == 4
