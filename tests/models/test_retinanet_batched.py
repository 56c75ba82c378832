"""The batch-wide matching, losses and post-processing of RetinaNetDetector against torchvision's
own per-image code (``torchvision.models.detection.RetinaNet``'s methods called on our model)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, nms, sigmoid_focal_loss

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
        split["cls_logits"],
        split["bbox_regression"],
        split_anchors,
        shapes,
        model.box_coder,
        model.score_thresh,
        topk,
        model.nms_thresh,
        per_image,
        fallbacks.append,
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
                split["cls_logits"],
                split["bbox_regression"],
                split_anchors,
                shapes,
                model.box_coder,
                model.score_thresh,
                topk,
                model.nms_thresh,
                model.detections_per_img,
                fallback,
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
        split["cls_logits"],
        split["bbox_regression"],
        split_anchors,
        shapes,
        model.box_coder,
        model.score_thresh,
        model.topk_candidates,
        model.nms_thresh,
        model.detections_per_img,
        fallback,
    )
    assert_same_detections(ours, theirs)
    # ~3000 float32 candidates of 21 classes per image: an exact same-class tie is likely somewhere
    # (image 3 here), and such an image is torchvision's; the others went the batched way
    assert fallbacks == [3]


# ---------------------------------------------------------------- pad_targets


def test_pad_targets_of_no_images_is_empty():
    boxes, labels, valid = batched.pad_targets([], torch.device("cpu"))
    assert boxes.shape == (0, 0, 4) and labels.shape == (0, 0) and valid.shape == (0, 0)
    assert boxes.dtype == torch.float32


def test_pad_targets_keeps_a_single_images_float64_boxes():
    t = [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64), "labels": torch.tensor([5])}]
    boxes, labels, valid = batched.pad_targets(t, torch.device("cpu"))
    assert boxes.dtype == torch.float64
    assert boxes.tolist() == [[[1.0, 2.0, 3.0, 4.0]]] and labels.tolist() == [[5]] and valid.tolist() == [[True]]


# ---------------------------------------------------------------- pairwise_iou


def test_pairwise_iou_of_disjoint_and_subpixel_overlaps_equals_box_iou():
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.5, 0.5]]])
    anchors = torch.tensor([[[20.0, 20.0, 30.0, 30.0], [9.5, 9.5, 20.0, 20.0], [0.0, 0.0, 10.0, 10.0]]])
    got = batched.pairwise_iou(gt, anchors)
    assert torch.equal(got[0], box_iou(gt[0], anchors[0]))
    assert got[0, 0, 0] == 0.0


# ---------------------------------------------------------------- match / assign


def _matcher_case():
    # IoUs with the box (0, 0, 10, 10): 0.4 and 0.5 exactly (the thresholds), 0.3 (below low, but
    # the box's best anchor), then 0.45 only with box 2 (between the thresholds).
    # float64, so that 40 / 100 is the threshold 0.4 itself
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]]], dtype=torch.float64)
    anchors = torch.tensor(
        [[[0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0], [100.0, 100.0, 110.0, 103.0]]],
        dtype=torch.float64,
    )
    return gt, anchors


@pytest.mark.parametrize("low_quality", [False, True])
def test_match_at_the_exact_thresholds_equals_torchvisions_matcher(low_quality):
    gt, anchors = _matcher_case()
    valid = torch.ones(1, 2, dtype=torch.bool)
    got = batched.assign(gt, valid, anchors, 0.5, 0.4, low_quality)
    expected = Matcher(0.5, 0.4, low_quality)(box_iou(gt[0], anchors[0]))
    assert torch.equal(got[0], expected)
    # the case reaches every rule: = low, = high, below low, low-quality only
    if not low_quality:
        assert got[0].tolist() == [-2, 0, -1, -1]


def test_match_without_boxes_is_int64_minus_one():
    got = batched.assign(
        torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 3, 4), 0.5, 0.4, True
    )
    assert got.dtype == torch.int64 and got.tolist() == [[-1] * 3] * 2


def test_assign_with_more_boxes_than_anchors():
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 9.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])
    anchors = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 29.0]]])
    got = batched.assign(gt, torch.ones(1, 3, dtype=torch.bool), anchors, 0.5, 0.4, True)
    assert torch.equal(got[0], Matcher(0.5, 0.4, True)(box_iou(gt[0], anchors[0])))


# ---------------------------------------------------------------- focal loss


def _focal_inputs(dtype):
    logits = torch.tensor([[21.0, -3.0, 0.7], [-21.5, 2.5, 30.0], [0.1, -0.2, 0.3337]], dtype=dtype)
    pos_rows, pos_cols = torch.tensor([0, 2]), torch.tensor([1, 2])
    target = torch.zeros(3, 3, dtype=torch.float64)
    target[pos_rows, pos_cols] = 1.0
    return logits, pos_rows, pos_cols, target


def test_focal_loss_in_float64_beyond_the_float32_softplus_threshold():
    logits, rows, cols, target = _focal_inputs(torch.float64)
    got = batched._FocalLossSum.apply(logits, torch.ones(3), rows, cols, 0.25, 2.0)
    expected = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="sum")
    assert got.dtype == torch.float64
    assert abs(got.item() - expected.item()) <= 1e-13 * abs(expected.item())


def test_focal_loss_of_bfloat16_logits_is_computed_in_float32():
    logits, rows, cols, target = _focal_inputs(torch.bfloat16)
    x = logits.clone().requires_grad_()
    weights = torch.tensor([0.5, 1.0, 0.25])
    got = batched._FocalLossSum.apply(x, weights, rows, cols, 0.25, 2.0)
    per_entry = sigmoid_focal_loss(logits.double(), target, alpha=0.25, gamma=2.0, reduction="none")
    expected = (per_entry * weights.double()[:, None]).sum().item()
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) <= 1e-6 * abs(expected)
    got.backward()
    assert x.grad.dtype == torch.bfloat16


def test_focal_loss_of_a_million_confident_positives_cancels_in_float64():
    """Positives at logit +40 (p = 1 in fp32): each is first charged as a negative,
    (1 - alpha) * 40 * w (softplus(40) = 40 exactly), then corrected by alpha * 0 - (1 - alpha) * 40
    * w. The two sums are ~3e7 but cancel to float32 residues (~1e-3 in all), so a float32
    accumulation of either would be off by tenths or more; in float64 every partial sum here is exact
    (1e6 terms of 24 bits, ~45 bits in all), so the float32 result is that exact sum rounded once."""
    n, alpha = 1_000_003, 0.25
    weights = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5
    rows = torch.arange(n)
    got = batched._FocalLossSum.apply(torch.full((n, 1), 40.0), weights, rows, torch.zeros_like(rows), alpha, 2.0)
    charged = (weights * 40.0).double().sum() * (1.0 - alpha)  # each term as float32 forms it
    corrected = (weights * -(40.0 * (1.0 - alpha))).double().sum()
    expected = (charged + corrected).float()
    assert got.dtype == torch.float32
    assert 0.0 < abs(expected.item()) < 1.0
    assert got.item() == expected.item()


# ---------------------------------------------------------------- regression loss


def _regression_case(n_images):
    # every foreground anchor is its own ground-truth box: the encoded target is exactly 0, so
    # each row's L1 loss is the sum of |prediction|
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    anchors = anchors.expand(n_images, 3, 4).clone()
    gt = anchors.clone()
    pred = torch.tensor([[0.5, -0.25, 1.5, 0.0], [2.0, 0.0, 0.0, -1.0], [0.3, 0.3, 0.3, 0.3]])
    pred = pred.expand(n_images, 3, 4).clone()
    return pred, anchors, gt


def test_regression_loss_defaults_to_l1_of_one_image_with_one_foreground_anchor():
    pred, anchors, gt = _regression_case(1)
    matched = torch.tensor([[0, -1, -2]])
    got = batched.regression_loss(pred, anchors, gt, matched, BoxCoder((1.0, 1.0, 1.0, 1.0)))
    assert got.item() == pytest.approx(0.5 + 0.25 + 1.5)


def test_regression_loss_smooth_l1_uses_beta():
    pred, anchors, gt = _regression_case(2)
    matched = torch.tensor([[0, 1, -1], [-1, -1, 2]])
    got = batched.regression_loss(pred, anchors, gt, matched, BoxCoder((1.0, 1.0, 1.0, 1.0)), "smooth_l1", beta=0.4)

    def smooth(v, beta=0.4):
        v = abs(v)
        return 0.5 * v * v / beta if v < beta else v - 0.5 * beta

    rows = [sum(smooth(v) for v in r) for r in pred[0].tolist()]
    expected = ((rows[0] + rows[1]) / 2 + rows[2] / 1) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_regression_loss_names_the_unknown_loss():
    pred, anchors, gt = _regression_case(1)
    with pytest.raises(ValueError, match="giou"):
        batched.regression_loss(pred, anchors, gt, torch.tensor([[0, -1, -1]]), BoxCoder((1.0,) * 4), "giou")


# ---------------------------------------------------------------- _select_level


def _select_by_loop(scores, thresh, topk):
    out = torch.zeros_like(scores, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        kept = sorted((s, j) for j, s in enumerate(row) if s > thresh)[::-1][:topk]
        for _, j in kept:
            out[i, j] = True
    return out


def test_select_level_does_not_keep_a_score_equal_to_the_threshold():
    scores = torch.tensor([[0.5, 0.75, 0.25]])
    selected, tied = batched._select_level(scores, 0.5, 10)
    assert selected.tolist() == [[False, True, False]] and tied.tolist() == [False]


def test_select_level_ignores_nan_and_ties_below_the_threshold():
    nan = float("nan")
    # image 0 has more than k = 2 scores above the threshold (the top-k runs); image 1 keeps one
    # score, and its 2nd and 3rd best are equal but below the threshold (no tie at the cut)
    scores = torch.tensor([[nan, 0.9, 0.8, 0.7, nan, 0.6], [0.95, 0.01, 0.01, 0.0, 0.0, nan]])
    selected, tied = batched._select_level(scores, 0.05, 2)
    assert torch.equal(selected, _select_by_loop(scores, 0.05, 2))
    assert tied.tolist() == [False, False]


# ---------------------------------------------------------------- _ties_within_groups


def test_ties_within_groups_name_the_right_image():
    # num_classes 2: group 2 = image 1, class 0 holds the tie
    group = torch.tensor([0, 1, 2, 2, 3])
    scores = torch.tensor([0.5, 0.5, 0.3, 0.3, 0.9])
    assert batched._ties_within_groups(group, scores, 2, 2).tolist() == [False, True]


# ---------------------------------------------------------------- nms_per_image_and_class


def _nms_by_loop(boxes, scores, img, labels):
    keep = []
    for key in sorted(set(zip(img.tolist(), labels.tolist()))):
        idx = torch.tensor([k for k, (i, lab) in enumerate(zip(img.tolist(), labels.tolist())) if (i, lab) == key])
        keep += idx[nms(boxes[idx], scores[idx], 0.05)].tolist()
    return sorted(keep)


def test_nms_of_few_boxes_keeps_neighbouring_classes_apart():
    boxes = torch.tensor([[5.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 10.0]])
    scores = torch.tensor([0.9, 0.8])
    img, labels = torch.tensor([0, 0]), torch.tensor([0, 1])
    keep = batched.nms_per_image_and_class(boxes, scores, img, labels, 2, 0.05)
    assert sorted(keep.tolist()) == _nms_by_loop(boxes, scores, img, labels) == [0, 1]


def test_nms_of_many_boxes_keeps_more_images_than_classes_apart():
    # 1002 boxes (over the few-boxes limit): two equal boxes in (image 2, class 0) and (image 0,
    # class 1), and 1000 disjoint fillers
    fill = torch.arange(1000, dtype=torch.float32) * 20
    boxes = torch.cat(
        [torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2), torch.stack([fill, fill + 100, fill + 10, fill + 110], dim=1)]
    )
    scores = torch.linspace(0.9, 0.1, 1002)
    img = torch.cat([torch.tensor([2, 0]), torch.ones(1000, dtype=torch.int64)])
    labels = torch.cat([torch.tensor([0, 1]), torch.zeros(1000, dtype=torch.int64)])
    keep = batched.nms_per_image_and_class(boxes, scores, img, labels, 2, 0.05)
    assert sorted(keep.tolist()) == _nms_by_loop(boxes, scores, img, labels) == list(range(1002))


# ---------------------------------------------------------------- postprocess fallbacks


def _postprocess(level_logits, dpi):
    """Disjoint 10 px anchors along x, zero deltas (boxes = anchors), 2 classes; the fallback
    returns a marker so the test sees which images it answered."""
    n = level_logits[0].shape[0]
    anchors_per_level = []
    offset = 0
    for logits in level_logits:
        a = logits.shape[1]
        xs = (torch.arange(a, dtype=torch.float32) + offset) * 20
        anchors_per_level.append(torch.stack([xs, torch.zeros(a), xs + 10, torch.full((a,), 10.0)], dim=1))
        offset += a
    deltas = [torch.zeros(n, lg.shape[1], 4) for lg in level_logits]
    return batched.postprocess(
        level_logits,
        deltas,
        [anchors_per_level] * n,
        [(1000, 1000)] * n,
        BoxCoder((1.0,) * 4),
        score_thresh=0.05,
        topk_candidates=1,
        nms_thresh=0.5,
        detections_per_img=dpi,
        per_image_fallback=lambda i: {"fallback": i},
    )


def test_a_tie_at_the_topk_cut_of_the_first_level_falls_back():
    lo = -10.0
    # level 0: image 0's two best are equal, in two classes (a tie at the top-1 cut, none within
    # a class); level 1: no tie anywhere
    level0 = torch.tensor([[[2.0, lo], [lo, 2.0]], [[3.0, lo], [lo, lo]]])
    level1 = torch.tensor([[[1.0, lo], [lo, lo]], [[lo, 1.5], [lo, lo]]])
    out = _postprocess([level0, level1], dpi=10)
    assert out[0] == {"fallback": 0}
    assert "fallback" not in out[1] and out[1]["labels"].tolist() == [0, 1]


def test_equal_scores_inside_the_kept_detections_do_not_fall_back():
    lo = -10.0
    # one image, three levels of one anchor: scores 0.9, 0.8, 0.8 in different classes/anchors
    levels = [torch.tensor([[[2.2, lo]]]), torch.tensor([[[lo, 1.4]]]), torch.tensor([[[1.4, lo]]])]
    out = _postprocess(levels, dpi=3)
    assert "fallback" not in out[0] and len(out[0]["scores"]) == 3
    # and the same across the detections_per_img cut (2): torchvision's choice is unspecified
    assert _postprocess(levels, dpi=2)[0] == {"fallback": 0}
