"""The face-detector interface the pipeline depends on: a batch of frames in, faces per frame out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detected face in source-frame pixels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float  # detector confidence in [0, 1]
    landmarks: tuple[tuple[float, float], ...]  # five (x, y) points: eyes, nose, mouth corners

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@runtime_checkable
class FaceDetector(Protocol):
    """Detects faces in a batch of same-sized RGB frames (N×H×W×3 uint8 or a list of H×W×3)."""

    name: str

    def detect(self, frames: Sequence[np.ndarray] | np.ndarray) -> list[list[Face]]:
        """Faces per frame, each list sorted by descending score."""
        ...
