"""`RetinaFaceDetector`: the project's `FaceDetector` on biubug6's RetinaFace, one forward pass per batch."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .base import Face
from .box_utils import decode_boxes, decode_landmarks, nms, prior_boxes
from .weights import load_retinaface

# A panorama's network input may hold up to this many times max_size² pixels (see _network_size).
PANORAMA_AREA = 4
STRIDE = 32  # the coarsest feature map's: each side of the input is padded to a multiple of it

BGR_MEAN = (104.0, 117.0, 123.0)  # biubug6's training mean, subtracted in BGR order
PRE_NMS_TOP_K = 5000  # biubug6 detect.py's top_k: bounds NMS cost when the threshold is low

_NAMES = {"mobilenet0.25": "retinaface-mobilenet", "resnet50": "retinaface-resnet50"}


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the convolution before it (inference only).

    RetinaFace's blocks are Sequential(conv, bn, act): folding removes a third of the layers the
    forward pass runs (on 2 CPU cores BatchNorm took ~25 % of detection time) and changes outputs
    only by float rounding.
    """
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        layers = list(module)
        for i in range(len(layers) - 1):
            conv, bn = layers[i], layers[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return model


def _as_frames(frames: Sequence[np.ndarray] | np.ndarray) -> Sequence[np.ndarray]:
    """An N×H×W×3 uint8 array, or a list of same-sized H×W×3 uint8 frames, checked but not stacked:
    the frames are shrunk one by one before they are stacked (a 4K batch stacked first was a 200 MB
    copy made only to be shrunk)."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            raise ValueError(f"expected N×H×W×3 frames, got a single frame of shape {frames.shape}; wrap it in a list")
        batch: Sequence[np.ndarray] = frames
        shapes = {frames.shape[1:]} if frames.ndim == 4 else {frames.shape}
    else:
        batch = [np.asarray(f) for f in frames]
        shapes = {f.shape for f in batch}
        if len(shapes) > 1:
            raise ValueError(f"expected frames of one size, got shapes {sorted(shapes)}")
    for shape in shapes:
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"expected N×H×W×3 RGB frames, got frames of shape {shape}")
    dtypes = {batch.dtype} if isinstance(batch, np.ndarray) else {f.dtype for f in batch}
    if dtypes - {np.dtype(np.uint8)}:
        raise ValueError(f"expected uint8 frames, got {sorted(str(d) for d in dtypes)}")
    return batch


class RetinaFaceDetector:
    """RetinaFace face detector over batches of same-sized RGB uint8 frames.

    Frames whose long side exceeds `max_size` are downscaled (antialiased) before the network and
    boxes are scaled back, which is most of the cost on 1080p video; smaller frames are used as
    they are. Boxes are in source pixels, unclipped (a face at the edge may extend past it).
    """

    def __init__(
        self,
        backbone: str = "mobilenet0.25",
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.6,
        nms_threshold: float = 0.4,
        max_size: int | None = 640,
        max_faces: int | None = 50,
    ) -> None:
        if backbone not in _NAMES:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}; expected one of {sorted(_NAMES)}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if max_size is not None and max_size < 32:
            raise ValueError(f"max_size must be at least 32 pixels (or None), got {max_size}")
        self.name = _NAMES[backbone]
        self.backbone = backbone
        self.device = torch.device(device)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_size = max_size
        self.max_faces = max_faces
        self.model = fold_batch_norms(load_retinaface(backbone, weights).eval()).to(self.device)
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        # On the CPU, channels-last (the frames' own layout): oneDNN ran RetinaFace about 2× faster
        # than on NCHW input (75 vs 153 ms for 8 frames at 360×640, bench/bench_detect.py), as fast as
        # ONNX Runtime. On CUDA, NCHW: fp32 depthwise convolutions (MobileNet's) are cuDNN's weak case
        # in NHWC, and detection on the H200 took 2.4 s for 32 frames with channels-last input (slower
        # than 4 CPU threads); bench/gpu_verify.py's detect section times both layouts there.
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    def __repr__(self) -> str:
        return f"RetinaFaceDetector(backbone={self.backbone!r}, device={str(self.device)!r}, max_size={self.max_size})"

    def _network_size(self, height: int, width: int) -> tuple[int, int]:
        """The H, W fed to the network: the frame's, or shrunk so the long side is `max_size`; a frame
        wider (or taller) than 16:9 keeps its short side at up to 9/16 of `max_size`, within
        PANORAMA_AREA × max_size² pixels. Shrunk by its long side alone, a face filling the height of a
        15360×560 strip came out 25 px tall and was not found."""
        if self.max_size is None or max(height, width) <= self.max_size:
            return height, width
        by_long = self.max_size / max(height, width)
        by_short = min(1.0, self.max_size * 9 / 16 / min(height, width))
        by_area = math.sqrt(PANORAMA_AREA * self.max_size**2 / (height * width))
        scale = max(by_long, min(by_short, by_area))
        # The network pads each side to its coarsest stride: a strip a few pixels high costs as if
        # STRIDE high (a 4,000,000×2 frame ran at 1×1,800,000, 4 GB), so such a strip is held to the area.
        budget = PANORAMA_AREA * self.max_size**2
        if min(height, width) * scale < STRIDE and STRIDE * max(height, width) * scale > budget:
            scale = budget / (STRIDE * max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def preprocess(self, frames: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """N H×W×3 RGB uint8 frames → N×3×h×w float BGR minus the mean, resized to the network size.

        Large frames are shrunk on the CPU as uint8 with area averaging (OpenCV), each from its own
        array, before they are stacked and become float tensors: a 1080p batch as float would be 4× the
        bytes to convert, copy and filter.
        """
        return self._preprocess(_as_frames(frames))

    def _preprocess(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """`preprocess` of frames `_as_frames` has checked."""
        h, w = self._network_size(*frames[0].shape[:2])
        if (h, w) != tuple(frames[0].shape[:2]):
            batch = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
        else:
            batch = frames if isinstance(frames, np.ndarray) else np.stack(frames)
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        images = images.permute(0, 3, 1, 2).flip(1).float()  # RGB → BGR, NCHW shape
        return (images - self._mean).contiguous(memory_format=self.memory_format)

    def detect(self, frames: Sequence[np.ndarray] | np.ndarray) -> list[list[Face]]:
        """Faces per frame, each list sorted by descending score and capped at `max_faces`."""
        batch = _as_frames(frames)
        if len(batch) == 0:
            return []
        height, width = batch[0].shape[:2]
        with torch.inference_mode():
            images = self._preprocess(batch)
            net_h, net_w = images.shape[-2:]
            loc, conf, landms = self.model(images)
            priors = prior_boxes(net_h, net_w, self.device)
            if priors.shape[0] != loc.shape[1]:
                raise RuntimeError(f"{priors.shape[0]} priors for {loc.shape[1]} network outputs at {net_h}×{net_w}")
            scale = torch.tensor([width, height], dtype=torch.float32, device=self.device)
            boxes = decode_boxes(loc, priors).view(len(batch), -1, 2, 2) * scale  # N×A×2×2 (corner, xy)
            points = decode_landmarks(landms, priors) * scale  # N×A×5×2
            scores = conf[..., 1]
            return [self._select(boxes[i].reshape(-1, 4), scores[i], points[i]) for i in range(len(batch))]

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor) -> list[Face]:
        """Threshold, top-k, NMS and cap for one frame (A×4 boxes, A scores, A×5×2 points, pixels)."""
        keep = torch.nonzero(scores >= self.score_threshold).squeeze(1)
        if keep.numel() > PRE_NMS_TOP_K:
            keep = keep[torch.topk(scores[keep], PRE_NMS_TOP_K).indices]
        keep = keep[nms(boxes[keep], scores[keep], self.nms_threshold)]
        if self.max_faces is not None:
            keep = keep[: self.max_faces]
        boxes, scores, points = boxes[keep].cpu().tolist(), scores[keep].cpu().tolist(), points[keep].cpu().tolist()
        return [
            Face(box=tuple(b), score=s, landmarks=tuple(tuple(p) for p in pts))
            for b, s, pts in zip(boxes, scores, points)
        ]
