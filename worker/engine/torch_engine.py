"""The PyTorch engine: rebuilds the card's architecture from `training.models` and loads its weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from worker.engine.base import describe_engine
from worker.engine.model_card import ModelCard, sha256_file
from worker.preprocess import crops_to_tensor_layout


class TorchEngine:
    def __init__(self, model_dir: Path, *, device: str = "cpu", batch_size: int = 32) -> None:
        from training.models import create_model  # the one place architectures are defined

        self.model_dir = Path(model_dir)
        self.card = ModelCard.load(self.model_dir)
        weights = self.model_dir / self.card.files["weights"]
        self.sha256 = sha256_file(weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        model = create_model(self.card.architecture, **self.card.architecture_kwargs)
        state = torch.load(weights, map_location="cpu", weights_only=True)  # never unpickle code
        model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        self.backend = f"pytorch-{self.device.type}"

    @torch.inference_mode()
    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), dtype=np.float32)
        x = crops_to_tensor_layout(crops)
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = torch.from_numpy(x[i : i + self.batch_size]).to(self.device)
            logits = self.model(batch)
            out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def describe(self) -> dict:
        return describe_engine(self.card, self.backend, self.sha256)
