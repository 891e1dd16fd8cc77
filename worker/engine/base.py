"""The model-engine interface: a batch of face crops in, a fake probability per crop out."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from worker.engine.model_card import ModelCard


@runtime_checkable
class Engine(Protocol):
    card: ModelCard
    backend: str  # e.g. "pytorch-cpu", "onnxruntime-cpu", "tensorrt-fp16"
    sha256: str  # of the weights file this backend runs

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """N×S×S×3 uint8 RGB crops → N float32 fake probabilities in [0, 1]."""
        ...

    def describe(self) -> dict:
        """The verdict's `model` block."""
        ...


def describe_engine(card: ModelCard, backend: str, sha256: str) -> dict:
    """The verdict's `model` block; an untrained model says so in plain words, and a card's own
    caveat (the packaged demo model's: not trained on deepfake data) rides along on every verdict."""
    block = {
        "name": card.name,
        "version": card.version,
        "architecture": card.architecture,
        "sha256": sha256,
        "backend": backend,
        "trained": card.trained,
        "training_data": card.training_data,
    }
    if not card.trained:
        block["warning"] = "randomly initialised model: its scores carry no information (for tests only)"
    elif card.warning:
        block["warning"] = card.warning
    return block


class BadModelOutput(ValueError):
    """An engine's scores that are no probabilities: the verdict is an `internal` error, never a label."""


def checked_probabilities(probs: np.ndarray, n: int) -> np.ndarray:
    """`probs` as n fake probabilities, or BadModelOutput. A NaN compared with the threshold is never
    above it: a model that overflowed (fp16 logits past 65504), or weights gone bad, would have had
    every face called real, and the upload allowed."""
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    if probs.shape[0] != n:
        raise BadModelOutput(f"the model gave {probs.shape[0]} scores for {n} crops")
    bad = ~(np.isfinite(probs) & (probs >= 0.0) & (probs <= 1.0))
    if bad.any():
        raise BadModelOutput(f"the model gave {int(bad.sum())} of {n} scores outside [0, 1] "
                             f"(e.g. {float(probs[bad][0])}): not probabilities")
    return probs
