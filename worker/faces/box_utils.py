"""RetinaFace anchors, box/landmark decoding and NMS (biubug6's `PriorBox`, `decode`, `decode_landm`).

Everything here is in torch so it runs on the detector's device; no torchvision. Boxes and
priors are normalised to the network input (0..1) until the caller scales them to pixels.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

MIN_SIZES: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))  # anchor sides (px) per level
STEPS: tuple[int, ...] = (8, 16, 32)  # level strides (px)
VARIANCE: tuple[float, float] = (0.1, 0.2)  # centre and log-size scales of the regression targets


@lru_cache(maxsize=16)
def _prior_boxes_cpu(height: int, width: int) -> torch.Tensor:
    parts = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float32) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float32) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # row-major, like the heads' h·w flattening
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor([[s / width, s / height] for s in sizes], dtype=torch.float32)
        wh = wh.unsqueeze(0).expand(centres.shape[0], -1, -1)
        parts.append(torch.cat([centres, wh], dim=-1).reshape(-1, 4))
    return torch.cat(parts)


def prior_boxes(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Anchors (cx, cy, w, h) normalised to an H×W input, A×4 in the heads' output order.

    Per level: rows of ceil(H/step)·ceil(W/step) locations, each with its two anchor sizes
    (clip=False, as biubug6). Cached per input size, so a video's frames compute them once.
    """
    return _prior_boxes_cpu(int(height), int(width)).to(device)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variance: tuple[float, float] = VARIANCE) -> torch.Tensor:
    """Regression outputs (…×A×4) + priors (A×4) → corner boxes (x1, y1, x2, y2), normalised, …×A×4."""
    centres = priors[..., :2] + loc[..., :2] * variance[0] * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(loc[..., 2:] * variance[1])
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)


def decode_landmarks(
    pre: torch.Tensor, priors: torch.Tensor, variance: tuple[float, float] = VARIANCE
) -> torch.Tensor:
    """Landmark outputs (…×A×10) + priors (A×4) → five (x, y) points, normalised, …×A×5×2."""
    offsets = pre.reshape(*pre.shape[:-1], 5, 2)
    return priors[..., None, :2] + offsets * variance[0] * priors[..., None, 2:]


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of K×4 corner boxes, K×K (continuous areas, no biubug6 "+1" pixel convention)."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = area[:, None] + area[None, :] - inter
    return inter / union.clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; indices of kept boxes (int64), by descending score.

    One IoU matrix, then a greedy pass over it: after the score threshold only tens of candidates
    remain per frame, so the K×K matrix is tiny and the Python loop is short.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    overlaps = (box_iou(boxes[order]) > iou_threshold).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
