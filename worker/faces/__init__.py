"""Face detection: the `FaceDetector` interface and a registry of the detectors that implement it."""
from __future__ import annotations

from typing import Any, Callable

from .base import Face, FaceDetector

__all__ = ["Face", "FaceDetector", "available_detectors", "create_detector"]


def _retinaface(backbone: str) -> Callable[..., FaceDetector]:
    def make(**kwargs: Any) -> FaceDetector:
        from .detector import RetinaFaceDetector  # lazy: keeps `import worker.faces` free of torch

        return RetinaFaceDetector(backbone=backbone, **kwargs)

    return make


_REGISTRY: dict[str, Callable[..., FaceDetector]] = {
    "retinaface-mobilenet": _retinaface("mobilenet0.25"),  # embedded weights; weights=<path> optional
    "retinaface-resnet50": _retinaface("resnet50"),  # needs weights=<path to Resnet50_Final.pth>
}


def available_detectors() -> list[str]:
    """Names `create_detector` accepts."""
    return sorted(_REGISTRY)


def create_detector(name: str = "retinaface-mobilenet", **kwargs: Any) -> FaceDetector:
    """A detector by registry name; kwargs go to its constructor (weights, device, thresholds, …)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown face detector {name!r}; available: {', '.join(available_detectors())}") from None
    return factory(**kwargs)
