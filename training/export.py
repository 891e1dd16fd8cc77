"""Write a model directory the worker loads: weights, model card and (later) ONNX."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.engine.model_card import ModelCard

WEIGHTS_FILE = "weights.pt"


def save_model_dir(
    model: nn.Module, out_dir: Path, *, name: str, version: str, architecture: str,
    architecture_kwargs: dict[str, Any] | None = None, trained: bool, input_size: int = 299,
    threshold: float = 0.5, **card_fields: Any,
) -> ModelCard:
    """Save `model`'s state dict (tensors only, loadable with weights_only=True) and its card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / WEIGHTS_FILE)
    card = ModelCard(
        name=name, version=version, architecture=architecture, architecture_kwargs=architecture_kwargs or {},
        input_size=input_size, threshold=threshold, trained=trained, files={"weights": WEIGHTS_FILE},
        **card_fields,
    )
    card.save(out_dir)
    return card
