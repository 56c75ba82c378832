"""The one place where VOC's pixel convention meets the continuous xyxy convention of the code.

VOC XML and the devkit's result files use 1-based *inclusive* pixel indices: a box covering pixels
1..3 has xmin=1, xmax=3 and, in the devkit, width xmax - xmin + 1 = 3. Inside the code boxes are
continuous 0-based xyxy (torchvision's convention): the same box is x1=0, x2=3, width x2 - x1 = 3.
The two conversions below are exact inverses, and plain IoU on converted boxes equals the devkit's
"+1" IoU on the original ones (detectron2's VOC loader and evaluator use the same pair).
"""

from __future__ import annotations

import numpy as np


def voc_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """1-based inclusive VOC pixel boxes (xmin, ymin, xmax, ymax) -> continuous 0-based xyxy."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] -= 1.0
    return out


def xyxy_to_voc(boxes: np.ndarray) -> np.ndarray:
    """Continuous 0-based xyxy -> 1-based inclusive VOC pixel boxes; the inverse of voc_to_xyxy."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out
