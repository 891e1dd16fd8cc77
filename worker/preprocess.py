"""Face cropping and the log-DCT spectrum: the one preprocessing both training and serving use.

Training (`training.data`) and the worker import these functions, and the model's in-graph
spectrum layer is built from :func:`dct_matrix`, so a crop is made and transformed the same way
wherever it is scored. Paper section II-B-2: the 2-D DCT-II is a 1-D DCT over the rows then the
columns, per channel, and the spectrum is its log-scaled magnitude.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

CROP_SCALE = 1.3  # paper section III-A: "enlarged face crop with a scale factor of 1.3"
DEFAULT_CROP_SIZE = 299  # Xception's input size
# The log floor sits at the 8-bit quantisation noise of an orthonormal DCT coefficient (1/255/sqrt(12)
# ≈ 1.1e-3 for crops in [0, 1]): below it a coefficient is noise, and a smaller eps lets float32
# rounding in near-zero bins swing the log (fp32 ONNX/TensorRT vs PyTorch then disagree ~1e-4).
SPECTRUM_EPS = 1e-3


def square_crop_box(
    box: np.ndarray | list[float], frame_width: int, frame_height: int, scale: float = CROP_SCALE
) -> tuple[int, int, int, int]:
    """The face box grown `scale`× about its centre into a square, moved and clipped into the frame.

    A square that sticks out is shifted inside; one larger than the frame's short side shrinks to
    it, so crops stay square and are never stretched. Returns integer (x1, y1, x2, y2), x2/y2
    exclusive, with at least one pixel each way.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    side = min(max(x2 - x1, y2 - y1, 1.0) * scale, float(min(frame_width, frame_height)))
    left, top = cx - side / 2.0, cy - side / 2.0

    def place(start: float, length: float, limit: int) -> tuple[int, int]:
        start = min(max(start, 0.0), limit - length)
        lo = int(round(start))
        hi = int(round(start + length))
        hi = min(max(hi, lo + 1), limit)
        return lo, hi

    cx1, cx2 = place(left, side, frame_width)
    cy1, cy2 = place(top, side, frame_height)
    return cx1, cy1, cx2, cy2


def crop_face(
    frame: np.ndarray, box: np.ndarray | list[float], size: int = DEFAULT_CROP_SIZE, scale: float = CROP_SCALE
) -> np.ndarray:
    """Cut the `scale`× square around `box` from an HxWx3 uint8 frame and resize it to size×size."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 frame, got shape {frame.shape}")
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = square_crop_box(box, w, h, scale)
    patch = frame[y1:y2, x1:x2]
    interpolation = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interpolation)


@lru_cache(maxsize=8)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix D (n×n, float64): DCT(x) = D @ x for a length-n vector."""
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    d = np.cos(np.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * np.sqrt(2.0 / n)
    d[0, :] = np.sqrt(1.0 / n)
    d.setflags(write=False)
    return d


def dct2(x: np.ndarray) -> np.ndarray:
    """Orthonormal 2-D DCT-II over the last two axes (rows, then columns): D_h · X · D_wᵀ."""
    h, w = x.shape[-2:]
    return dct_matrix(h) @ np.asarray(x, dtype=np.float64) @ dct_matrix(w).T


def log_dct_spectrum(x: np.ndarray, eps: float = SPECTRUM_EPS) -> np.ndarray:
    """log(|DCT(x)| + eps) over the last two axes; `x` is channel-first (..., C, H, W) in [0, 1].

    This is the reference the model's in-graph spectrum layer is tested against.
    """
    return np.log(np.abs(dct2(x)) + eps).astype(np.float32)


def crops_to_tensor_layout(crops: np.ndarray) -> np.ndarray:
    """N×H×W×3 uint8 RGB crops → N×3×H×W float32 in [0, 1], the model's input layout."""
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected N×H×W×3 crops, got shape {crops.shape}")
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
