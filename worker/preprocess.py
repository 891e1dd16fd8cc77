"""Face cropping and the log-DCT spectrum: the one preprocessing both training and serving use.

Training (`training.data`) and the worker import these functions, and the model's in-graph
spectrum layer is built from :func:`dct_matrix`, so a crop is made and transformed the same way
wherever it is scored. Paper section II-B-2: the 2-D DCT-II is a 1-D DCT over the rows then the
columns, per channel, and the spectrum is its log-scaled magnitude.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

CROP_SCALE = 1.3  # paper section III-A: "enlarged face crop with a scale factor of 1.3"
DEFAULT_CROP_SIZE = 299  # Xception's input size
# The log floor sits at the 8-bit quantisation noise of an orthonormal DCT coefficient (1/255/sqrt(12)
# ≈ 1.1e-3 for crops in [0, 1]): below it a coefficient is noise, and a smaller eps lets float32
# rounding in near-zero bins swing the log (fp32 ONNX/TensorRT vs PyTorch then disagree ~1e-4).
SPECTRUM_EPS = 1e-3
DEFAULT_DETECTOR = "retinaface-mobilenet"
# Raised whenever the same video gives different crops: a model is best served crops made the way
# its training crops were, so crop caches and model cards record the version they were made with.
PREPROCESSING_VERSION = 3
PREPROCESSING_CHANGES = {
    1: "frames read as stored, HDR as if it were SDR (deepfake 0.3.0 and earlier)",
    2: "HDR (PQ, HLG) and wide-gamut (BT.2020, P3) frames brought to SDR BT.709 before detection and cropping",
    3: "the fast sampling pass (the worker's default) decodes every frame a sampled frame refers to (AV1: every "
       "frame): it skipped a B-pyramid's referenced B-frames, so sampled B-frames decoded against missing "
       "references, and AV1's non-reference frames, so a neighbour was sampled in their place",
}


@dataclass(frozen=True)
class CropRecipe:
    """How face crops are made: crop side, enlargement, detector and preprocessing version.

    A crop cache records the recipe of its crops and a model card the recipe of the crops it was
    trained on, so that crops cut another way are never mixed into a cache and the worker cuts a
    model's crops as its training crops were cut.
    """

    size: int = DEFAULT_CROP_SIZE
    scale: float = CROP_SCALE
    detector: str = DEFAULT_DETECTOR
    version: int = PREPROCESSING_VERSION

    def __post_init__(self) -> None:
        if int(self.size) < 1 or not float(self.scale) > 0 or int(self.version) < 1 or not self.detector:
            raise ValueError(f"not a crop recipe: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CropRecipe":
        try:
            return cls(size=int(data["size"]), scale=float(data["scale"]), detector=str(data["detector"]),
                       version=int(data["version"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a crop recipe (size, scale, detector, version): {data!r}") from exc

    def conflicts(self, other: "CropRecipe") -> list[str]:
        """What makes `other`'s crops differ in geometry from these ("size 299, not 128"); empty if none.

        The version is left out: it changes only some videos' crops (see `changes_since`)."""
        return [f"{name} {getattr(other, name)}, not {getattr(self, name)}"
                for name in ("size", "scale", "detector") if getattr(other, name) != getattr(self, name)]

    def changes_since(self) -> list[str]:
        """What preprocessing has changed since this recipe's version, oldest first."""
        return [PREPROCESSING_CHANGES[v] for v in range(self.version + 1, PREPROCESSING_VERSION + 1)]


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
