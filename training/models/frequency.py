"""Fixed (non-trainable) frequency transforms for the MD-CSDNetwork's second branch.

Each layer maps RGB crops (B,3,H,W) in [0,1] to a log-magnitude spectrum of the same shape, per
channel, using only matrix products against constant buffers so that the graph exports to ONNX
(``torch.fft`` does not). Paper section II-B-2 uses the DCT; Table VI compares DWT and FFT, which
is why all three exist here. The DCT matrix comes from :func:`worker.preprocess.dct_matrix` so the
in-graph spectrum is the numpy reference :func:`worker.preprocess.log_dct_spectrum`, bit for bit
up to float32 rounding.

Buffers are non-persistent: they are rebuilt from the input size, not stored in checkpoints.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from worker.preprocess import SPECTRUM_EPS, dct_matrix


def dft_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal DFT as real matrices: F = C - iS with C[k,m] = cos(2πkm/n)/√n, S = sin(...)/√n."""
    k = np.arange(n, dtype=np.int64)
    # Reduce k·m mod n first: keeps cos/sin accurate for large k·m.
    ang = 2.0 * np.pi * (np.outer(k, k) % n).astype(np.float64) / n
    scale = 1.0 / np.sqrt(n)
    return np.cos(ang) * scale, np.sin(ang) * scale


def haar_matrix(n: int) -> np.ndarray:
    """One-level orthonormal Haar analysis matrix W (n×n): rows [low-pass; high-pass].

    Low rows: (x[2k] + x[2k+1])/√2; high rows: (x[2k] - x[2k+1])/√2. For odd n the last sample has
    no partner and passes through as an extra low-pass row (still orthogonal), so W·X·Wᵀ is the
    usual [[LL, LH], [HL, HH]] tiling for any size, 299 included.
    """
    half = n // 2
    n_low = n - half
    w = np.zeros((n, n), dtype=np.float64)
    r = 1.0 / np.sqrt(2.0)
    for k in range(half):
        w[k, 2 * k] = r
        w[k, 2 * k + 1] = r
        w[n_low + k, 2 * k] = r
        w[n_low + k, 2 * k + 1] = -r
    if n % 2:
        w[half, n - 1] = 1.0
    return w


class _FixedTransform(nn.Module):
    """Base: size checks and the eps used in log(|·| + eps)."""

    name: str = ""

    def __init__(self, size: int, eps: float = SPECTRUM_EPS) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        self.size = int(size)
        self.eps = float(eps)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[-2] != self.size or x.shape[-1] != self.size:
            raise ValueError(f"{type(self).__name__} built for (B,C,{self.size},{self.size}), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"size={self.size}, eps={self.eps}"


class LogDCT(_FixedTransform):
    """log(|D·X·Dᵀ| + eps) per channel, D the orthonormal DCT-II matrix of worker.preprocess."""

    name = "dct"

    def __init__(self, size: int, eps: float = SPECTRUM_EPS) -> None:
        super().__init__(size, eps)
        d = torch.from_numpy(np.array(dct_matrix(self.size), dtype=np.float32))
        self.register_buffer("dct", d, persistent=False)  # (S,S)
        self.register_buffer("dct_t", d.t().contiguous(), persistent=False)  # (S,S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B,3,S,S)
        self._check(x)
        y = torch.matmul(torch.matmul(self.dct, x), self.dct_t)  # rows then columns
        return torch.log(torch.abs(y) + self.eps)


class LogFFT(_FixedTransform):
    """log(|F·X·Fᵀ| + eps) per channel, F the orthonormal 2-D DFT written with real cos/sin matrices.

    F·X·Fᵀ = (C - iS) X (C - iS)ᵀ = (CXC - SXS) - i(CXS + SXC) since C and S are symmetric. Equal to
    ``log(abs(np.fft.fft2(x, norm="ortho")) + eps)`` (no fftshift: DC stays at [0, 0], as in the DCT).
    """

    name = "fft"

    def __init__(self, size: int, eps: float = SPECTRUM_EPS) -> None:
        super().__init__(size, eps)
        c, s = dft_matrices(self.size)
        # Right factor [C | S] (S,2S); left factor [C; S] (2S,S): two matmuls give all four products.
        self.register_buffer("right", torch.from_numpy(np.concatenate([c, s], 1).astype(np.float32)), persistent=False)
        self.register_buffer("left", torch.from_numpy(np.concatenate([c, s], 0).astype(np.float32)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B,3,S,S)
        self._check(x)
        n = self.size
        q = torch.matmul(self.left, torch.matmul(x, self.right))  # (B,3,2S,2S) = [[CXC, CXS], [SXC, SXS]]
        re = q[..., :n, :n] - q[..., n:, n:]
        im = q[..., :n, n:] + q[..., n:, :n]  # sign irrelevant for the magnitude
        return torch.log(torch.sqrt(re * re + im * im) + self.eps)


class LogDWT(_FixedTransform):
    """One-level 2-D Haar DWT, sub-bands tiled [[LL, LH], [HL, HH]] into S×S, log-magnitude."""

    name = "dwt"

    def __init__(self, size: int, eps: float = SPECTRUM_EPS) -> None:
        super().__init__(size, eps)
        w = torch.from_numpy(haar_matrix(self.size).astype(np.float32))
        self.register_buffer("haar", w, persistent=False)  # (S,S)
        self.register_buffer("haar_t", w.t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B,3,S,S)
        self._check(x)
        y = torch.matmul(torch.matmul(self.haar, x), self.haar_t)
        return torch.log(torch.abs(y) + self.eps)


FREQUENCY_TRANSFORMS: dict[str, type[_FixedTransform]] = {"dct": LogDCT, "fft": LogFFT, "dwt": LogDWT}


@torch.no_grad()
def spectrum_stats(crops: torch.Tensor, transform: str = "dct", eps: float = SPECTRUM_EPS) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a transform's output over crops (N,3,S,S) in [0,1].

    How the MD-CSDNetwork's frequency-branch normalisation constants are made; run it on training
    crops to replace the defaults (``freq_mean=..., freq_std=...``).
    """
    y = create_transform(transform, crops.shape[-1], eps)(crops.float()).double()  # (N,3,S,S)
    mean = y.mean(dim=(0, 2, 3))
    std = y.std(dim=(0, 2, 3))
    return mean.tolist(), std.tolist()


def create_transform(name: str, size: int, eps: float = SPECTRUM_EPS) -> _FixedTransform:
    """Build a frequency layer by name: "dct", "fft" or "dwt"."""
    try:
        cls = FREQUENCY_TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown frequency transform {name!r}; choose from {sorted(FREQUENCY_TRANSFORMS)}") from None
    return cls(size, eps)
