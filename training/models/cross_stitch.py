"""Cross-stitch unit (Misra et al., CVPR 2016) as used by MD-CSDNetwork (paper Eq. 1).

At every location (i, j) of two same-shaped activation maps x_R (RGB branch) and x_D (frequency
branch):

    [x_R']   [a_RR  a_RD] [x_R]
    [x_D'] = [a_DR  a_DD] [x_D]

One scalar alpha per pair, shared by all channels and locations — the per-layer form of Misra et al.
whose gradients the MD-CSD paper writes in Eq. 3 (a sum over i, j of one scalar's products). The
paper initialises a_RR = a_DD = 0.9 and a_RD = a_DR = 0.1 (a convex combination that keeps the
activations' scale) and trains the alphas with a higher learning rate (1e-3 vs 2e-4). Every
parameter here is called ``...cross_stitch...alpha`` so a training loop can find them by name, or use
:func:`stitch_parameters`.

Both branches must have the same shape at the stitch (same backbone and width); a unit between
different widths would need a projection, which the paper does not have, so it is refused.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

STITCH_PARAM_MARKER = "cross_stitch"


class CrossStitch(nn.Module):
    """Learnable 2×2 mixing of two equally-shaped activation maps; alpha[0] -> RGB out, alpha[1] -> freq out."""

    def __init__(self, self_weight: float = 0.9, cross_weight: float = 0.1) -> None:
        super().__init__()
        init = torch.tensor([[self_weight, cross_weight], [cross_weight, self_weight]], dtype=torch.float32)
        self.alpha = nn.Parameter(init)  # [[a_RR, a_RD], [a_DR, a_DD]]

    def forward(self, x_r: torch.Tensor, x_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,C,H,W), (B,C,H,W) -> (B,C,H,W), (B,C,H,W). Both outputs use BOTH inputs."""
        if not torch.jit.is_tracing() and x_r.shape != x_d.shape:
            raise ValueError(f"cross-stitch needs equal shapes, got {tuple(x_r.shape)} and {tuple(x_d.shape)}")
        a = self.alpha
        out_r = a[0, 0] * x_r + a[0, 1] * x_d
        out_d = a[1, 0] * x_r + a[1, 1] * x_d
        return out_r, out_d

    def extra_repr(self) -> str:
        a = self.alpha.detach().tolist()
        return f"alpha=[[{a[0][0]:.3f}, {a[0][1]:.3f}], [{a[1][0]:.3f}, {a[1][1]:.3f}]]"


def is_stitch_parameter(name: str) -> bool:
    """True for the alphas of cross-stitch units (by parameter name)."""
    return STITCH_PARAM_MARKER in name


def named_stitch_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if is_stitch_parameter(name):
            yield name, p


def stitch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The cross-stitch alphas, e.g. for their own optimizer group (paper: lr 1e-3 vs base 2e-4)."""
    return [p for _, p in named_stitch_parameters(model)]


def param_groups(model: nn.Module, lr: float = 2e-4, stitch_lr: float = 1e-3) -> list[dict]:
    """Two optimizer groups: everything else at `lr`, the stitch alphas at `stitch_lr` (paper II-C)."""
    stitch, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (stitch if is_stitch_parameter(name) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "base"}]
    if stitch:
        groups.append({"params": stitch, "lr": stitch_lr, "name": "cross_stitch"})
    return groups
