"""Model engines behind one interface; `load_engine` picks one for a model directory."""
from __future__ import annotations

from pathlib import Path

from worker.engine.base import Engine
from worker.engine.model_card import ModelCard

ENGINES = ("pytorch",)


def load_engine(model_dir: Path, *, backend: str = "pytorch", device: str = "cpu", batch_size: int = 32) -> Engine:
    if backend == "pytorch":
        from worker.engine.torch_engine import TorchEngine

        return TorchEngine(model_dir, device=device, batch_size=batch_size)
    raise ValueError(f"unknown engine {backend!r}; available: {', '.join(ENGINES)}")


__all__ = ["Engine", "ModelCard", "load_engine", "ENGINES"]
