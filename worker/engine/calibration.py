"""INT8 calibration crops, shared by the TensorRT and the ONNX Runtime INT8 builds.

Real face crops as the worker makes them (`worker.preprocess.crop_face`), N×S×S×3 uint8 RGB: a
directory of images (recursively: a crop cache's split works; resized to S), a `.npy` file, or such
an array (`DEEPFAKE_INT8_CALIBRATION`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_calibration_crops(source: Any, size: int) -> np.ndarray:
    """N×S×S×3 uint8 RGB crops from an array, a ``.npy`` file, or a directory of images, searched
    recursively (so a crop cache's split, ``python -m training extract`` output, works), resized to S."""
    if isinstance(source, np.ndarray):
        crops = source
    else:
        path = Path(source)
        if path.is_file() and path.suffix == ".npy":
            crops = np.load(path)
        elif path.is_dir():
            import cv2

            images = []
            for p in sorted(path.rglob("*")):
                if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                    continue
                bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if bgr is None:
                    continue
                if bgr.shape[:2] != (size, size):
                    bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
                images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if not images:
                raise ValueError(f"no calibration images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
            crops = np.stack(images)
        else:
            raise ValueError(f"calibration source {source!r} is neither a directory of images nor a .npy file")
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise ValueError(f"calibration crops must be N×{size}×{size}×3 uint8, got {crops.dtype} {crops.shape}")
    return crops
