"""Input normalisation fitted to the training data (paper II-B: "both the branches are separately
normalized").

The RGB branch uses Xception's fixed ImageNet convention; the frequency branch's log-spectrum has
no such convention, so `train` measures its per-channel mean and std on a spread of training crops
before the first step and stores them in the model (buffers, so checkpoints, exports and the
worker's engines all carry them).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm import tqdm

from training.models import spectrum_stats

__all__ = ["fit_frequency_norm", "unaugmented"]


def fit_frequency_norm(model: nn.Module, dataset: Dataset, crops: int = 256, batch_size: int = 32,
                       progress: bool = True) -> tuple[list[float], list[float]] | None:
    """Set `model`'s frequency-branch normalisation to the statistics of up to `crops` crops of
    `dataset` ((x, label, video_id) items, x (3,S,S) in [0,1]), spread evenly over it.

    Returns (mean, std), or None for a model without a frequency branch (nothing to fit).
    """
    if "freq" not in getattr(model, "branches", ()):
        return None
    dataset = unaugmented(dataset)  # validation, test and serving crops are never augmented
    n = min(int(crops), len(dataset))  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("fitting the frequency normalisation needs at least one training crop")
    index = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(int)).tolist()  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, index), batch_size=batch_size, shuffle=False)

    def batches() -> Iterator[torch.Tensor]:
        for x, *_ in tqdm(loader, desc="frequency normalisation", unit="batch", leave=False, disable=not progress):
            yield x

    cfg = model.init_kwargs  # type: ignore[attr-defined]
    mean, std = spectrum_stats(batches(), cfg["transform"], cfg["eps"], cfg["spectrum_precision"])
    model.set_freq_norm(mean, std)  # type: ignore[operator]
    return mean, std


def unaugmented(dataset: Dataset) -> Dataset:
    """`dataset` with its augmentation off (a CropDataset's `transform` and `hflip`, through Subset and
    ConcatDataset wrappers), for statistics that must describe the crops the model is served: `train
    --augment`'s zooms, greys and contrast shifts moved the fitted log-spectrum mean by about 0.4 std."""
    if isinstance(dataset, Subset):
        return Subset(unaugmented(dataset.dataset), dataset.indices)
    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([unaugmented(d) for d in dataset.datasets])
    if getattr(dataset, "transform", None) is None and not getattr(dataset, "hflip", False):
        return dataset
    plain = copy.copy(dataset)  # shares any crops held in memory
    if hasattr(plain, "transform"):
        plain.transform = None  # type: ignore[attr-defined]
    if hasattr(plain, "hflip"):
        plain.hflip = False  # type: ignore[attr-defined]
    return plain
