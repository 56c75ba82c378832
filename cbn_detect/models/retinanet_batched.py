"""RetinaNet's anchor assignment, losses and post-processing over a whole batch at once.

torchvision's ``RetinaNet`` does each of these image by image in Python: a ``Matcher`` call per
image, a focal loss and a box loss per image, and per image and level a top-k, a decoding and an
NMS. The functions here compute the same numbers with batch-wide tensor ops:

- assignment: the IoU of every anchor with every ground-truth box of the batch, ground truth
  padded to the batch's largest count (padding has IoU -1, so it never wins), then torchvision's
  ``Matcher`` rules (fg/bg thresholds, low-quality matches) as masks over the whole batch;
- losses: the focal loss of every (image, anchor, class), fused with its gradient into one
  autograd function, and the L1 loss of every foreground anchor, summed per image, divided by
  that image's foreground count, averaged over images - torchvision's reductions, so the values
  agree to float rounding (summation order);
- post-processing: per level the scores above the threshold of every image (a top-k over the
  batch only where some image has more than ``topk_candidates``), decoding and clipping of those,
  then one NMS with (image, class) groups for the batch.

Every elementwise step (IoU, box coding, clipping) repeats torchvision's float operations in the
same order, so matches and boxes are bitwise torchvision's. Where torchvision's detections depend
on an unspecified order - which of equal scores ``topk`` or an unstable sort puts first - the
batched path cannot promise the same choice, so an image where equal scores decide something is
handed to torchvision's own per-image code (``postprocess`` takes that fallback as an argument).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, nms

# Elements of the (images x boxes x anchors) IoU tensor computed in one go; larger batches are
# matched in chunks of images so the temporaries stay near 128 MB each.
IOU_CHUNK_ELEMENTS = 2**25
# Elements of the (anchors x classes) logits the CPU focal loss takes per block (a few 512 KB
# temporaries: cache-resident, yet large enough for intra-op threads).
FOCAL_BLOCK_ELEMENTS = 2**17


def pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(boxes (N, G, 4), labels (N, G), valid (N, G)): every image's ground truth padded to the
    batch's largest count G (padding: zero boxes, label 0, valid False), boxes in their dtype
    (fp32 also where autocast gives the anchors bf16, as in torchvision's per-image IoU)."""
    n = len(targets)
    counts = [len(t["boxes"]) for t in targets]
    g = max(counts, default=0)
    dtype = targets[0]["boxes"].dtype if targets else torch.float32
    boxes = torch.zeros((n, g, 4), dtype=dtype, device=device)
    labels = torch.zeros((n, g), dtype=torch.int64, device=device)
    for i, (t, c) in enumerate(zip(targets, counts)):  # copies only, no per-image compute
        if c:
            boxes[i, :c] = t["boxes"]
            labels[i, :c] = t["labels"]
    valid = torch.arange(g, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    return boxes, labels, valid


def pairwise_iou(gt: Tensor, anchors: Tensor) -> Tensor:
    """IoU (N, G, A) of boxes ``gt`` (N, G, 4) with ``anchors`` (N, A, 4): ``box_iou``'s float
    operations in its order, so each value is bitwise what torchvision computes per image."""
    gx1, gy1, gx2, gy2 = (gt[..., i, None] for i in range(4))  # (N, G, 1)
    ax1, ay1, ax2, ay2 = (anchors[:, None, :, i] for i in range(4))  # (N, 1, A)
    area_gt = (gx2 - gx1) * (gy2 - gy1)
    area_anchor = (ax2 - ax1) * (ay2 - ay1)
    w = (torch.minimum(gx2, ax2) - torch.maximum(gx1, ax1)).clamp_(min=0)
    h = (torch.minimum(gy2, ay2) - torch.maximum(gy1, ay1)).clamp_(min=0)
    inter = w.mul_(h)
    union = (area_gt + area_anchor).sub_(inter)
    return inter.div_(union)


def match(iou: Tensor, valid: Tensor, high: float, low: float, allow_low_quality_matches: bool) -> Tensor:
    """torchvision ``Matcher`` over a batch: (N, A) index of each anchor's ground truth, -1 below
    ``low``, -2 between ``low`` and ``high``. ``iou`` (N, G, A) is overwritten (padding -> -1).

    Low-quality matches as torchvision: every anchor that attains some box's highest IoU (ties
    included) takes its best box even below ``high``. An image without boxes matches nothing.
    """
    n, g, a = iou.shape
    if g == 0:
        return torch.full((n, a), -1, dtype=torch.int64, device=iou.device)
    iou.masked_fill_(~valid[:, :, None], -1.0)
    best, matches = iou.max(dim=1)  # first index among equal IoUs, as torchvision's max(dim=0)
    best_box = matches.clone() if allow_low_quality_matches else None
    matches[best < low] = -1
    matches[(best >= low) & (best < high)] = -2
    if best_box is not None:
        highest = iou.amax(dim=2, keepdim=True)  # (N, G, 1); padding: -1, masked out below
        attains = ((iou == highest) & valid[:, :, None]).any(dim=1)
        matches = torch.where(attains, best_box, matches)
    return matches


def assign(
    gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, high: float, low: float, allow_low_quality: bool
) -> Tensor:
    """Matched ground-truth index (N, A) of every anchor (see ``match``), in chunks of images
    small enough that the IoU tensor stays under ``IOU_CHUNK_ELEMENTS``."""
    n, g = gt_valid.shape
    per_image = max(1, g * anchors.shape[1])
    step = max(1, IOU_CHUNK_ELEMENTS // per_image)
    return torch.cat(
        [
            match(
                pairwise_iou(gt_boxes[s : s + step], anchors[s : s + step]),
                gt_valid[s : s + step],
                high,
                low,
                allow_low_quality,
            )
            for s in range(0, n, step)
        ]
    )


class _FocalLossSum(torch.autograd.Function):
    """sum_r weights[r] * sum_k focal(logits[r, k], target[r, k]), for a target that is 1 exactly at
    (pos_rows, pos_cols) and 0 elsewhere; its gradient is computed in the forward pass.

    torchvision's ``sigmoid_focal_loss`` takes a dozen elementwise passes over the dense (anchors x
    classes) tensor and autograd twenty more; the closed forms below take ten in all, written
    block by block so that a block's temporaries stay in cache (on CPU; one block on a GPU).
    Every entry is first treated as a negative, then the few positives are corrected.
    """

    @staticmethod
    def forward(ctx, logits, weights, pos_rows, pos_cols, alpha, gamma):  # noqa: ANN001, ANN205
        x = logits.detach()
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 logits: fp32 arithmetic
        # softplus(x) = x above the threshold, exact to the dtype's precision: exp(-40) < 2^-52
        softplus = functools.partial(F.softplus, threshold=40.0 if dtype == torch.float64 else 20.0)
        weights = weights.to(dtype)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(x, dtype=dtype) if want_grad else None
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        rows = x.shape[0]
        step = max(1, FOCAL_BLOCK_ELEMENTS // max(1, x.shape[1]) if x.device.type == "cpu" else rows)
        for start in range(0, rows, step):
            xb = x[start : start + step].to(dtype)
            wb = weights[start : start + step, None]
            p, s = torch.sigmoid(xb), softplus(xb)  # s = -log(1 - p): the negatives' CE
            pg = p.pow(gamma)
            total += torch.mul(pg, s).mul_(wb).sum(dtype=torch.float64)
            if want_grad:  # d/dx (p^g s) = p^g (g (1 - p) s + p)
                g = torch.addcmul(p, torch.rsub(p, 1.0), s, value=gamma).mul_(pg)
                grad[start : start + step] = g.mul_(wb * (1.0 - alpha))
        total *= 1.0 - alpha
        xp, wp = x[pos_rows, pos_cols].to(dtype), weights[pos_rows]
        p, s_neg, s_pos = torch.sigmoid(xp), softplus(xp), softplus(-xp)
        q = torch.rsub(p, 1.0)
        loss_as_negative = (1.0 - alpha) * p.pow(gamma) * s_neg
        loss_as_positive = alpha * q.pow(gamma) * s_pos  # s_pos = -log(p)
        total += ((loss_as_positive - loss_as_negative) * wp).sum(dtype=torch.float64)
        if want_grad:  # d/dx (q^g s_pos) = -q^g (g p s_pos + q)
            grad[pos_rows, pos_cols] = -alpha * q.pow(gamma) * (gamma * p * s_pos + q) * wp
            ctx.save_for_backward(grad)
        ctx.input_dtype = logits.dtype
        return total.to(dtype)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.input_dtype), None, None, None, None, None


def classification_loss(
    cls_logits: Tensor, gt_labels: Tensor, matched: Tensor, ignore: int, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """torchvision's RetinaNet focal loss over a batch: per image the sum over anchors not
    ``ignore``d (-2) and all classes, divided by max(1, foreground anchors), then the mean over
    images. ``cls_logits`` (N, A, K), ``gt_labels`` (N, G), ``matched`` (N, A)."""
    n, a, k = cls_logits.shape
    foreground = matched >= 0
    img, anchor = foreground.nonzero(as_tuple=True)
    per_image = 1.0 / (foreground.sum(dim=1).clamp(min=1) * n)  # (N,)
    weights = (matched != ignore) * per_image[:, None].float()  # (N, A)
    return _FocalLossSum.apply(
        cls_logits.reshape(n * a, k),
        weights.reshape(-1),
        img * a + anchor,
        gt_labels[img, matched[img, anchor]],
        alpha,
        gamma,
    )


def regression_loss(
    bbox_regression: Tensor,
    anchors: Tensor,
    gt_boxes: Tensor,
    matched: Tensor,
    box_coder: BoxCoder,
    loss_type: str = "l1",
    beta: float = 1.0,
) -> Tensor:
    """torchvision's RetinaNet box loss over a batch: per image the L1 (or smooth L1) loss of the
    encoded foreground boxes, summed, divided by max(1, foreground anchors), mean over images."""
    foreground = matched >= 0
    img, anchor = foreground.nonzero(as_tuple=True)
    target = box_coder.encode_single(gt_boxes[img, matched[img, anchor]], anchors[img, anchor])
    pred = bbox_regression[img, anchor]
    if loss_type == "l1":
        rows = torch.nn.functional.l1_loss(pred, target, reduction="none").sum(dim=1)
    elif loss_type == "smooth_l1":
        rows = torch.nn.functional.smooth_l1_loss(pred, target, reduction="none", beta=beta).sum(dim=1)
    else:
        raise ValueError(f"batched box loss supports 'l1' and 'smooth_l1', not {loss_type!r}")
    # sum_n (sum of image n's rows) / max(1, fg_n) / N as one weighted sum (no scatter, deterministic)
    per_image = 1.0 / (foreground.sum(dim=1).clamp(min=1) * max(1, len(bbox_regression)))
    return (rows * per_image[img].to(rows.dtype)).sum()


def _select_level(scores: Tensor, score_thresh: float, topk: int) -> tuple[Tensor, Tensor]:
    """(selected (N, M), tied (N,)) for one level's scores (N, M): each image's ``topk`` best
    scores above ``score_thresh``, as torchvision's per-image top-k over the kept scores, and
    whether a tie straddles that cut (which of the tied torchvision's top-k keeps is unspecified).

    Without ties the set of the k best is unique, so only its k-th best score is needed; the
    top-k runs only when some image has more than k scores above the threshold.
    """
    keep = scores > score_thresh  # NaN is never kept, as in torchvision
    counts = keep.sum(dim=1)
    if topk >= scores.shape[1] or int(counts.max()) <= topk:
        return keep, torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    # Where more than k scores pass, the k+1 best all pass: no need to mask the others (but NaN,
    # which topk ranks first). Elsewhere the k-th best is below every kept score.
    ranked = scores.masked_fill(scores.isnan(), float("-inf")) if scores.isnan().any() else scores
    best = ranked.topk(topk + 1, dim=1, sorted=False).values
    below, kth = best.topk(2, dim=1, largest=False).values.unbind(dim=1)  # (k+1)-th, k-th best
    return keep & (scores >= kth[:, None]), (below == kth) & (counts > topk)


def _ties_within_groups(group: Tensor, scores: Tensor, n: int, num_classes: int) -> Tensor:
    """(n,) whether image i has two candidates of one class (``group`` = image * num_classes +
    class) with equal ``scores`` (in [0, 1]): NMS would then visit them in an unspecified order."""
    key = torch.sort(group.double() * 2 + scores.double()).values  # (group, score) -> [2g, 2g + 1]
    tied = torch.zeros(n, dtype=torch.bool, device=group.device)
    tied[torch.div(torch.floor(key[1:][key[1:] == key[:-1]] / 2).long(), num_classes, rounding_mode="floor")] = True
    return tied


def nms_per_image_and_class(
    boxes: Tensor, scores: Tensor, img: Tensor, labels: Tensor, num_classes: int, iou_threshold: float
) -> Tensor:
    """Indices of ``boxes`` kept by NMS within each (image, class) group, by decreasing score.

    Many boxes: ``batched_nms`` with one group per (image, class), which loops over the groups
    as torchvision's per-image calls would. Few boxes: ``batched_nms`` would shift each group to
    its own place (``group * (max + 1)`` on every coordinate), and with images x classes groups
    the offsets would round boxes ever coarser (0.1 px at 16 images x 81 classes x 1333 px); here
    classes shift x and images shift y, so offsets stay below max(classes, images) x (max + 1),
    as torchvision's per image. Boxes must lie in [0, max] (they are clipped to their image).
    """
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000) or boxes.numel() == 0:
        return batched_nms(boxes, scores, img * num_classes + labels, iou_threshold)
    step = boxes.max() + 1
    shift = torch.stack((labels, img, labels, img), dim=1).to(boxes) * step
    return nms(boxes + shift, scores, iou_threshold)


def postprocess(
    cls_logits: Sequence[Tensor],
    bbox_regression: Sequence[Tensor],
    anchors: Sequence[Sequence[Tensor]],
    image_shapes: Sequence[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    detections_per_img: int,
    per_image_fallback: Callable[[int], dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """torchvision's ``RetinaNet.postprocess_detections``, batched: per level ``cls_logits`` (N,
    A_l, K) and ``bbox_regression`` (N, A_l, 4); ``anchors[image][level]`` (A_l, 4).

    Per level, each image's ``topk_candidates`` best scores above ``score_thresh``; their boxes
    decoded and clipped to their image; then NMS for the batch with (image, class) groups, and
    each image's ``detections_per_img`` best, by decreasing score. That is torchvision's result
    whatever order the candidates come in, as NMS visits them by score, except where equal scores
    make torchvision's choice depend on an unspecified order (``topk``, an unstable sort): which
    of them its top-k keeps, which of two of one class NMS visits first, which of them make the
    ``detections_per_img`` cut. An image with such a tie is answered by
    ``per_image_fallback(image index)`` (torchvision's own code) instead. Equal scores elsewhere
    change nothing but their order in the output, which is unspecified in torchvision too.
    """
    n = len(image_shapes)
    device = cls_logits[0].device
    tied = torch.zeros(n, dtype=torch.bool, device=device)
    hw = torch.tensor(image_shapes, dtype=bbox_regression[0].dtype, device=device)  # (N, 2)
    picked: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for level, (logits, deltas) in enumerate(zip(cls_logits, bbox_regression)):
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits).flatten(1)  # (N, A_l*K)
        selected, level_tied = _select_level(scores, score_thresh, topk_candidates)
        tied |= level_tied
        img, idx = selected.nonzero(as_tuple=True)
        anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
        level_anchors = torch.stack([a[level] for a in anchors])  # (N, A_l, 4)
        boxes = box_coder.decode_single(deltas[img, anchor_idx], level_anchors[img, anchor_idx])
        # clip_boxes_to_image, each box to its own image
        x = torch.minimum(boxes[:, 0::2].clamp(min=0), hw[img, 1, None])
        y = torch.minimum(boxes[:, 1::2].clamp(min=0), hw[img, 0, None])
        boxes = torch.stack((x, y), dim=-1).reshape(boxes.shape)
        picked.append((img, boxes, scores[img, idx], idx % num_classes))
    img, boxes, scores, labels = (torch.cat(column) for column in zip(*picked))
    tied |= _ties_within_groups(img * num_classes + labels, scores, n, num_classes)
    if tied.any():
        img, boxes, scores, labels = (t[~tied[img]] for t in (img, boxes, scores, labels))

    keep = nms_per_image_and_class(boxes, scores, img, labels, num_classes, nms_thresh)
    keep = keep[torch.sort(img[keep], stable=True).indices]  # grouped by image, still by score
    counts = torch.bincount(img[keep], minlength=n)
    rank = torch.arange(len(keep), device=device) - (counts.cumsum(0) - counts)[img[keep]]
    # equal scores across the detections_per_img cut: which torchvision keeps is unspecified
    first_out = (rank == detections_per_img).nonzero().flatten()
    cut_tied = scores[keep[first_out]] == scores[keep[first_out - 1]]
    tied[img[keep[first_out[cut_tied]]]] = True
    keep = keep[rank < detections_per_img]
    sizes = counts.clamp(max=detections_per_img).tolist()
    detections = [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(boxes[keep].split(sizes), scores[keep].split(sizes), labels[keep].split(sizes))
    ]
    for i in tied.nonzero().flatten().tolist():
        detections[i] = per_image_fallback(i)
    return detections
