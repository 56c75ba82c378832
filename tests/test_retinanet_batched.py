"""The batch-wide matching, losses and post-processing of RetinaNetDetector against torchvision's
own per-image code (``torchvision.models.detection.RetinaNet``'s methods called on our model)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from cbn_detect.models import build_retinanet
from cbn_detect.models import retinanet_batched as batched

NUM_CLASSES = 4
TINY = dict(
    depth="resnet10",
    base_width=8,
    fpn_channels=16,
    returned_stages=(2, 3, 4),
    extra_levels="none",
    anchor_sizes=(16, 32, 64),
    head_convs=1,
    min_size=64,
    max_size=64,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_retinanet(num_classes=NUM_CLASSES, **TINY)


def targets_of_every_kind() -> list[dict[str, torch.Tensor]]:
    """Several classes, a duplicated box (equal IoUs: which wins?), a box too small for any anchor
    to reach 0.4 (a low-quality match only), a box larger than the image, and no box at all."""
    box = lambda *xyxy: list(map(float, xyxy))  # noqa: E731
    return [
        {
            "boxes": torch.tensor([box(4, 6, 30, 40), box(4, 6, 30, 40), box(33, 2, 60, 20), box(50, 50, 53, 52)]),
            "labels": torch.tensor([1, 3, 2, 4]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([box(0, 0, 64, 64), box(10, 10, 22, 26)]), "labels": torch.tensor([4, 1])},
    ]


def head_outputs_and_anchors(model, n: int, seed: int = 0):
    """Random head outputs that give both losses real values, and the model's anchors for n
    images of 64 px."""
    gen = torch.Generator().manual_seed(seed)
    features = [torch.zeros(n, 16, s, s) for s in (8, 4, 2)]
    anchors = model.anchor_generator(ImageList(torch.zeros(n, 3, 64, 64), [(64, 64)] * n), features)
    a = anchors[0].shape[0]
    head_outputs = {
        "cls_logits": (torch.randn(n, a, NUM_CLASSES + 1, generator=gen) * 2 - 3).requires_grad_(),
        "bbox_regression": (torch.randn(n, a, 4, generator=gen) * 0.3).requires_grad_(),
    }
    return head_outputs, anchors


def test_matching_equals_torchvisions_matcher_per_image(model, monkeypatch):
    targets = targets_of_every_kind()
    _, anchors = head_outputs_and_anchors(model, len(targets))
    expected = []
    for t, a in zip(targets, anchors):
        if len(t["boxes"]) == 0:
            expected.append(torch.full((len(a),), -1))
        else:
            from torchvision.ops import box_iou

            expected.append(model.proposal_matcher(box_iou(t["boxes"], a)))
    anchors_t = torch.stack(anchors)
    boxes, _, valid = batched.pad_targets(targets, anchors_t.device)
    m = model.proposal_matcher
    got = batched.assign(boxes, valid, anchors_t, m.high_threshold, m.low_threshold, m.allow_low_quality_matches)
    assert torch.equal(got, torch.stack(expected))
    # every kind of match is exercised: foreground, background, ignored, and the duplicate's first index
    assert {-2, -1, 0, 2, 3}.issubset(set(got[0].tolist())) and 1 not in got[0].tolist()
    assert (got[1] == -1).all()
    # images matched in chunks give the same answer
    monkeypatch.setattr(batched, "IOU_CHUNK_ELEMENTS", 1)
    assert torch.equal(
        batched.assign(boxes, valid, anchors_t, m.high_threshold, m.low_threshold, m.allow_low_quality_matches), got
    )


@pytest.mark.parametrize(
    ("loss_type", "anchor_dtype"),
    [("l1", torch.float32), ("smooth_l1", torch.float32), ("l1", torch.bfloat16)],
    ids=["l1", "smooth_l1", "bf16_anchors"],  # autocast makes the anchors bf16, not the targets
)
def test_losses_and_gradients_equal_torchvisions(model, loss_type, anchor_dtype, monkeypatch):
    monkeypatch.setattr(model.head.regression_head, "_loss_type", loss_type)
    targets = targets_of_every_kind()
    head_outputs, anchors = head_outputs_and_anchors(model, len(targets))
    anchors = [a.to(anchor_dtype) for a in anchors]
    ours = model.compute_loss(targets, head_outputs, anchors)
    theirs = RetinaNet.compute_loss(model, targets, head_outputs, anchors)
    assert set(ours) == set(theirs) == {"classification", "bbox_regression"}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
        assert ours[key] > 0
    inputs = list(head_outputs.values())
    grads_ours = torch.autograd.grad(sum(ours.values()), inputs)
    grads_theirs = torch.autograd.grad(sum(theirs.values()), inputs)
    for g_ours, g_theirs in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-8)


def test_a_batch_without_any_box_has_torchvisions_losses(model):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    head_outputs, anchors = head_outputs_and_anchors(model, 2)
    ours = model.compute_loss([empty, empty], head_outputs, anchors)
    theirs = RetinaNet.compute_loss(model, [empty, empty], head_outputs, anchors)
    torch.testing.assert_close(ours["classification"], theirs["classification"], rtol=1e-5, atol=0)
    assert ours["bbox_regression"] == theirs["bbox_regression"] == 0


def test_an_unknown_box_loss_falls_back_to_torchvision(model, monkeypatch):
    monkeypatch.setattr(model.head.regression_head, "_loss_type", "giou")
    targets = targets_of_every_kind()
    head_outputs, anchors = head_outputs_and_anchors(model, len(targets))
    ours = model.compute_loss(targets, head_outputs, anchors)
    theirs = RetinaNet.compute_loss(model, targets, head_outputs, anchors)
    assert torch.equal(ours["bbox_regression"], theirs["bbox_regression"])


def split_per_level(model, head_outputs, anchors):
    sizes = [a.shape[0] for a in model.anchor_generator.cell_anchors]
    per_level = [n * s * s for n, s in zip(sizes, (8, 4, 2))]
    split = {k: [t.detach() for t in v.split(per_level, dim=1)] for k, v in head_outputs.items()}
    return split, [list(a.split(per_level)) for a in anchors]


def assert_same_detections(ours, theirs):
    """Detection by detection: the same scores in the same order, and the same (score, label, box)
    triples; among equal scores the order is unspecified, in torchvision too."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        assert o.keys() == t.keys() and all(o[k].dtype == t[k].dtype for k in t)
        assert torch.equal(o["scores"], t["scores"])
        triples = lambda d: sorted(zip(d["scores"].tolist(), d["labels"].tolist(), d["boxes"].tolist()))  # noqa: E731
        assert triples(o) == triples(t)


@pytest.mark.parametrize(("topk", "per_image"), [(1000, 100), (7, 5)])
def test_detections_equal_torchvisions_one_by_one(model, topk, per_image, monkeypatch):
    monkeypatch.setattr(model, "topk_candidates", topk)
    monkeypatch.setattr(model, "detections_per_img", per_image)
    head_outputs, anchors = head_outputs_and_anchors(model, 3, seed=1)
    with torch.no_grad():
        head_outputs["cls_logits"][2] -= 20  # an image without any score above the threshold
    split, split_anchors = split_per_level(model, head_outputs, anchors)
    shapes = [(64, 64), (50, 61), (64, 40)]  # clipped to each image's own size
    fallbacks = []
    ours = batched.postprocess(
        split["cls_logits"], split["bbox_regression"], split_anchors, shapes, model.box_coder,
        model.score_thresh, topk, model.nms_thresh, per_image, fallbacks.append,
    )
    assert fallbacks == []  # random scores do not tie: everything went the batched way
    theirs = RetinaNet.postprocess_detections(model, split, split_anchors, shapes)
    assert_same_detections(ours, theirs)
    assert len(theirs[0]["boxes"]) == per_image if per_image < 100 else len(theirs[0]["boxes"]) > 20
    assert len(theirs[2]["boxes"]) == 0
    assert_same_detections(model.postprocess_detections(split, split_anchors, shapes), theirs)


def test_tied_scores_are_resolved_as_torchvision_does(model):
    """Saturated logits give scores of exactly 1.0 on overlapping boxes of one class: which box NMS
    keeps, and which tied candidates fill the top-k, is then torchvision's (unspecified) order."""
    head_outputs, anchors = head_outputs_and_anchors(model, 2, seed=2)
    with torch.no_grad():
        head_outputs["cls_logits"][0, :300, 2] = 40.0  # sigmoid == 1.0 in float32
    split, split_anchors = split_per_level(model, head_outputs, anchors)
    shapes = [(64, 64)] * 2
    fallbacks = []

    def fallback(i):
        fallbacks.append(i)
        one = {k: [t[i : i + 1] for t in v] for k, v in split.items()}
        return RetinaNet.postprocess_detections(model, one, [split_anchors[i]], [shapes[i]])[0]

    for topk in (1000, 50):
        fallbacks.clear()
        model.topk_candidates = topk  # the fallback is torchvision's code, reading the model's
        try:
            ours = batched.postprocess(
                split["cls_logits"], split["bbox_regression"], split_anchors, shapes, model.box_coder,
                model.score_thresh, topk, model.nms_thresh, model.detections_per_img, fallback,
            )
            theirs = RetinaNet.postprocess_detections(model, split, split_anchors, shapes)
            assert_same_detections(model.postprocess_detections(split, split_anchors, shapes), theirs)
        finally:
            model.topk_candidates = 1000
        assert fallbacks == [0]  # only the image with ties
        assert_same_detections(ours, theirs)
        assert (theirs[0]["scores"] == 1.0).sum() > 1

def test_eval_forward_returns_torchvisions_detections(model):
    """The whole eval forward, transform included, against the same weights run through
    torchvision's per-image post-processing."""
    model = copy.deepcopy(model).eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        model.head.classification_head.cls_logits.weight.mul_(100.0)  # scores from 0.05 to 1, no ties
        ours = model(images)
        model.postprocess_detections = lambda *a: RetinaNet.postprocess_detections(model, *a)
        theirs = model(images)
    assert [len(d["scores"].unique()) for d in theirs] == [model.detections_per_img] * 2  # batched path
    assert_same_detections(ours, theirs)


def test_fused_focal_loss_value_and_gradient_in_float64():
    """The closed-form gradient against autograd's numerical one, the value against torchvision's
    sigmoid_focal_loss, with logits from -30 to 30."""
    from torchvision.ops import sigmoid_focal_loss

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(12, 5, generator=gen, dtype=torch.float64) * 10).clamp(-30, 30).requires_grad_()
    weights = torch.rand(12, generator=gen, dtype=torch.float64)
    rows, cols = torch.tensor([0, 3, 4, 11]), torch.tensor([1, 0, 4, 2])
    target = torch.zeros(12, 5, dtype=torch.float64)
    target[rows, cols] = 1.0
    expected = (sigmoid_focal_loss(logits, target).sum(dim=1) * weights).sum()
    got = batched._FocalLossSum.apply(logits, weights, rows, cols, 0.25, 2.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0], rtol=1e-9, atol=1e-12
    )
    small = (logits.detach() / 10).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: batched._FocalLossSum.apply(x, weights, rows, cols, 0.25, 2.0), small)


def test_five_levels_many_images_and_classes(model):
    """R50's five levels and anchor sizes at 128 px, 4 images, 21 logits, random boxes: the losses
    and every detection as torchvision's."""
    from cbn_detect.models.retinanet import anchor_generator

    n, k, gen = 4, 21, torch.Generator().manual_seed(3)
    sides = (16, 8, 4, 2, 1)
    features = [torch.zeros(n, 1, s, s) for s in sides]
    images = ImageList(torch.zeros(n, 3, 128, 128), [(128, 128)] * n)
    anchors = anchor_generator((32, 64, 128, 256, 512))(images, features)
    a = anchors[0].shape[0]
    targets = []
    for count in (5, 1, 0, 12):
        wh = 128 * (0.05 + 0.6 * torch.rand(count, 2, generator=gen))
        xy = (128 - wh) * torch.rand(count, 2, generator=gen)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, k, (count,), generator=gen)})
    head_outputs = {
        "cls_logits": (torch.randn(n, a, k, generator=gen) * 2 - 3).requires_grad_(),
        "bbox_regression": (torch.randn(n, a, 4, generator=gen) * 0.3).requires_grad_(),
    }
    ours = model.compute_loss(targets, head_outputs, anchors)
    theirs = RetinaNet.compute_loss(model, targets, head_outputs, anchors)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)

    per_level = [9 * s * s for s in sides]
    split = {key: [t.detach() for t in v.split(per_level, dim=1)] for key, v in head_outputs.items()}
    split_anchors = [list(x.split(per_level)) for x in anchors]
    shapes = [(128, 128), (128, 100), (90, 128), (128, 128)]
    theirs = RetinaNet.postprocess_detections(model, split, split_anchors, shapes)
    assert all(len(d["scores"]) == model.detections_per_img for d in theirs)
    fallbacks = []

    def fallback(i):
        fallbacks.append(i)
        one = {key: [t[i : i + 1] for t in v] for key, v in split.items()}
        return RetinaNet.postprocess_detections(model, one, [split_anchors[i]], [shapes[i]])[0]

    ours = batched.postprocess(
        split["cls_logits"], split["bbox_regression"], split_anchors, shapes, model.box_coder,
        model.score_thresh, model.topk_candidates, model.nms_thresh, model.detections_per_img, fallback,
    )
    assert_same_detections(ours, theirs)
    # ~3000 float32 candidates of 21 classes per image: an exact same-class tie is likely somewhere
    # (image 3 here), and such an image is torchvision's; the others went the batched way
    assert fallbacks == [3]
