"""Self-blended images (Shiohara & Yamasaki, CVPR 2022): pseudo-fakes made from one real frame.

A copy of the frame is jittered (colour, brightness/contrast, blur/sharpen/downscale) and slightly
warped (scale, translation), then blended back into the original under a deformed, blurred face
mask with a random blend ratio. The result carries the generic traces of face swapping (blending
boundary, colour and resolution mismatch) without identity change, so a detector trained on it
learns those traces instead of one generator's fingerprints.

Differences from the paper, and why:
- the paper builds the mask from 81 dlib landmarks; the project's detector gives five, so the hull
  is built from points placed relative to the eyes, nose and mouth (brows, cheeks, chin);
- the paper sometimes augments the target instead of the source; here the target is never
  touched, so everything outside the mask is bit-identical to the real frame and the real/fake
  pair differs only where a face swap would.

All work happens inside a region of interest around the face, so the cost does not grow with the
frame size. Deterministic given the ``rng``.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import cv2
import numpy as np

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # the paper's choice: full blends most often
ROI_SCALE = 2.2  # the working window around the face box; the mask stays well inside it


class FaceLike(Protocol):
    box: Sequence[float]  # x1, y1, x2, y2
    landmarks: Sequence[Sequence[float]] | None  # five (x, y): eyes, nose, mouth corners


def _roi(box: Sequence[float], w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1, 4.0) * ROI_SCALE / 2
    return (max(0, int(cx - half)), max(0, int(cy - half)),
            min(w, int(np.ceil(cx + half))), min(h, int(np.ceil(cy + half))))


def face_hull_points(box: Sequence[float], landmarks: Sequence[Sequence[float]] | None) -> np.ndarray:
    """K×2 float32 points outlining the inner face (brows to chin, cheek to cheek).

    With five landmarks the outline follows the face's own axes (eye line and eye→mouth
    direction), so tilted faces get a tilted mask; without them an ellipse inside the box is used.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    lm = None if landmarks is None else np.asarray(landmarks, np.float32).reshape(-1, 2)
    if lm is None or lm.shape[0] < 5 or not np.isfinite(lm).all():
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.38, (y2 - y1) * 0.42
        a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1).astype(np.float32)
    le, re, nose, ml, mr = lm[:5]
    eye_c, mouth_c = (le + re) / 2, (ml + mr) / 2
    across = re - le
    iod = float(np.linalg.norm(across)) or max(x2 - x1, 1.0) * 0.4
    ux = across / iod  # unit vector from the left to the right eye
    down = mouth_c - eye_c
    em = float(np.linalg.norm(down)) or iod
    uy = down / em  # unit vector from the eyes towards the mouth
    pts = [
        le - 0.45 * iod * ux - 0.55 * em * uy, re + 0.45 * iod * ux - 0.55 * em * uy,  # brow ends
        eye_c - 0.75 * em * uy,  # forehead centre
        le - 0.55 * iod * ux, re + 0.55 * iod * ux,  # temples
        ml - 0.35 * iod * ux + 0.1 * em * uy, mr + 0.35 * iod * ux + 0.1 * em * uy,  # cheeks
        ml + 0.5 * em * uy, mr + 0.5 * em * uy,  # jaw
        mouth_c + 0.7 * em * uy,  # chin
        nose,
    ]
    return np.asarray(pts, np.float32)


def _random_mask(shape: tuple[int, int], pts: np.ndarray, face_size: float, rng: np.random.Generator) -> np.ndarray:
    """A blurred, randomly deformed hull mask in [0, 1] (H×W float32)."""
    centre = pts.mean(0)
    grow = rng.uniform(0.9, 1.15)  # the paper's hull is sometimes larger, sometimes tighter
    radial = rng.uniform(0.92, 1.08, size=(len(pts), 1))  # per-vertex deformation
    pts = centre + (pts - centre) * grow * radial
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, hull, 255)
    k = int(max(1, face_size * rng.uniform(0.02, 0.08)))  # erode or dilate a little
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    sigma = max(0.5, face_size * rng.uniform(0.02, 0.08))
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    soft[soft < 1e-3] = 0.0  # exact zeros outside: the target stays untouched there
    return np.minimum(soft, 1.0, out=soft)  # float blur can overshoot 1 by an ulp or two


def _jitter_source(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour, brightness/contrast and frequency changes: the source/target mismatch to detect."""
    img = src.astype(np.float32)
    shift = rng.uniform(4, 20, size=3) * rng.choice([-1.0, 1.0], size=3)  # per-channel RGB shift
    if rng.random() < 0.5:
        shift = shift * rng.uniform(0.0, 0.5)  # sometimes mostly a brightness change
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-15, 15)
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * contrast + mean + brightness + shift
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.3 and img.shape[2] == 3:  # saturation change in HSV
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] *= rng.uniform(0.8, 1.2)
        img = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    kind = rng.integers(0, 4)
    if kind == 1:  # slight blur
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    elif kind == 2:  # sharpen (unsharp mask)
        blur = cv2.GaussianBlur(img, (0, 0), 1.0)
        img = cv2.addWeighted(img, 1.0 + rng.uniform(0.3, 1.0), blur, -rng.uniform(0.3, 1.0), 0)
    elif kind == 3:  # lost resolution, as a generator working at a lower size
        h, w = img.shape[:2]
        f = rng.uniform(0.4, 0.8)
        small = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return img


def _warp_source(src: np.ndarray, centre: np.ndarray, face_size: float, rng: np.random.Generator) -> np.ndarray:
    """A small random scale and translation about the face centre (the paper's landmark mismatch)."""
    scale = rng.uniform(0.95, 1.05)
    t = rng.uniform(-0.03, 0.03, size=2) * face_size
    m = np.array([[scale, 0.0, (1 - scale) * centre[0] + t[0]],
                  [0.0, scale, (1 - scale) * centre[1] + t[1]]], np.float32)
    h, w = src.shape[:2]
    return cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def self_blend(frame: np.ndarray, face: FaceLike | Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A self-blended fake of `frame` (H×W×3 uint8) at `face` → (fake H×W×3 uint8, mask H×W float32).

    `mask` is the blend weight actually used (already multiplied by the blend ratio): the fake is
    ``source·mask + frame·(1−mask)`` and equals `frame` exactly wherever the mask is 0.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 frame, got {frame.shape} {frame.dtype}")
    h, w = frame.shape[:2]
    box = [float(v) for v in face.box]
    rx1, ry1, rx2, ry2 = _roi(box, w, h)
    if rx2 - rx1 < 4 or ry2 - ry1 < 4:
        raise ValueError(f"face box {box} lies outside the {w}×{h} frame")
    off = np.array([rx1, ry1], np.float32)
    landmarks = getattr(face, "landmarks", None)
    pts = face_hull_points(box, landmarks) - off
    face_size = max(box[2] - box[0], box[3] - box[1], 4.0)
    target = frame[ry1:ry2, rx1:rx2]
    mask = _random_mask(target.shape[:2], pts, face_size, rng)
    source = _warp_source(_jitter_source(target, rng), pts.mean(0), face_size, rng)
    mask *= np.float32(rng.choice(BLEND_RATIOS))
    m = mask[..., None]
    blended = np.round(source.astype(np.float32) * m + target.astype(np.float32) * (1.0 - m))
    blended = np.where(m > 0, np.clip(blended, 0, 255), target).astype(np.uint8)
    fake = frame.copy()
    fake[ry1:ry2, rx1:rx2] = blended
    full = np.zeros((h, w), np.float32)
    full[ry1:ry2, rx1:rx2] = mask
    return fake, full
