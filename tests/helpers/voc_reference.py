"""A plain transcription of the VOC devkit's VOCevaldet.m and VOCap.m, the reference that the
vectorised evaluator and the training runs' mAP are checked against."""

from __future__ import annotations

import math

MATLAB_TENTHS = [0.0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 1 - 4 * 0.1, 1 - 3 * 0.1, 0.8, 0.9, 1.0]


def reference_ap(gt_images, det_images, n_classes, metric, threshold=0.5):
    """VOCevaldet.m + VOCap.m line by line, on VOC-convention tuples."""
    aps = {}
    for c in range(1, n_classes + 1):
        gts = [[(box, diff) for lab, box, diff in objs if lab == c] for objs in gt_images]
        taken = [[False] * len(g) for g in gts]
        npos = sum(not diff for g in gts for _, diff in g)
        found = [(s, i, box) for i, ds in enumerate(det_images) for lab, s, box in ds if lab == c]
        found.sort(key=lambda d: -d[0])
        tp, fp = [], []
        for _, i, bb in found:
            ovmax, jmax = -math.inf, None
            for j, (g, _) in enumerate(gts[i]):
                iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
                ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                    if iw * ih / ua > ovmax:
                        ovmax, jmax = iw * ih / ua, j
            is_tp = is_fp = 0
            if ovmax >= threshold:
                if not gts[i][jmax][1]:
                    if taken[i][jmax]:
                        is_fp = 1
                    else:
                        is_tp, taken[i][jmax] = 1, True
            else:
                is_fp = 1
            tp.append((tp[-1] if tp else 0) + is_tp)
            fp.append((fp[-1] if fp else 0) + is_fp)
        if npos == 0:
            aps[c] = None
            continue
        rec = [t / npos for t in tp]
        prec = [t / (t + f) if t + f else math.nan for t, f in zip(tp, fp)]
        if metric == "voc07":
            ap = 0.0
            for t in MATLAB_TENTHS:
                ps = [p for r, p in zip(rec, prec) if r >= t and not math.isnan(p)]
                ap += (max(ps) if ps else 0.0) / 11
        else:
            mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
            for k in range(len(mpre) - 2, -1, -1):
                mpre[k] = mpre[k + 1] if math.isnan(mpre[k]) else max(mpre[k], mpre[k + 1])
            steps = [k for k in range(1, len(mrec)) if mrec[k] != mrec[k - 1]]
            ap = sum((mrec[k] - mrec[k - 1]) * mpre[k] for k in steps)
        aps[c] = ap
    return aps
