"""Fixed (non-trainable) frequency transforms for the MD-CSDNetwork's second branch.

Each layer maps RGB crops (B,3,H,W) in [0,1] to a log-magnitude spectrum of the same shape, per
channel, using only matrix products against constant buffers so that the graph exports to ONNX
(``torch.fft`` does not). Paper section II-B-2 uses the DCT; Table VI compares DWT and FFT, which
is why all three exist here. The DCT matrix comes from :func:`worker.preprocess.dct_matrix` so the
in-graph spectrum is the numpy reference :func:`worker.preprocess.log_dct_spectrum` to float32
summation error (the products run in float32 by default, what TensorRT runs; ``precision="float64"``
gives the reference to float32 rounding, see :class:`_FixedTransform`).

Buffers are non-persistent: they are rebuilt from the input size, not stored in checkpoints.
"""
from __future__ import annotations

from collections.abc import Iterable

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


PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


class _FixedTransform(nn.Module):
    """Base: fixed matrices as buffers, size checks, precision, and log(|·| + eps).

    `precision` is the dtype of the matrix products. The default, float32, is what TensorRT and
    ONNX Runtime run (TensorRT has no float64 matmul). It is backend-stable because eps
    (worker.preprocess.SPECTRUM_EPS = 1e-3, the 8-bit quantisation floor) keeps the log from
    magnifying float32 summation error (~1e-5 on a coefficient) in near-zero bins; with eps=1e-6 that
    error moved ONNX Runtime's probabilities ~1e-4 from PyTorch's. "float64" remains for reference
    checks. The result is cast back to the input's dtype before the log, so the layer takes and
    returns float32. The matrices are rebuilt in `precision` after ``.to()`` / ``.half()``, and
    autocast is disabled inside (fp16/TF32 matmuls would be far coarser).
    """

    name: str = ""

    def __init__(self, size: int, eps: float = SPECTRUM_EPS, precision: str = "float32") -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.size = int(size)
        self.eps = float(eps)
        self.precision = precision
        self._register_matrices(torch.device("cpu"))

    def _matrices(self) -> dict[str, np.ndarray]:
        """name -> float64 matrix, registered as a non-persistent buffer (rebuilt from `size`)."""
        raise NotImplementedError

    def _register_matrices(self, device: torch.device) -> None:
        for name, m in self._matrices().items():
            t = torch.from_numpy(np.ascontiguousarray(m)).to(device=device, dtype=PRECISIONS[self.precision])
            self.register_buffer(name, t, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # .to(device) must move the matrices, but .half()/.float()/.double() must not change them.
        super()._apply(fn, recurse)
        device = next(self.buffers()).device
        self._register_matrices(device)
        return self

    def _magnitude(self, x: torch.Tensor) -> torch.Tensor:
        """|transform(x)| for x (B,C,S,S) in the compute dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) in [0,1] -> (B,3,S,S) log-magnitude
        self._check(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            mag = self._magnitude(x.to(PRECISIONS[self.precision])).to(x.dtype)
            return torch.log(mag + self.eps)

    def _check(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # static shapes in an export; the check would only warn
            return
        if x.dim() != 4 or x.shape[-2] != self.size or x.shape[-1] != self.size:
            raise ValueError(f"{type(self).__name__} built for (B,C,{self.size},{self.size}), got {tuple(x.shape)}: "
                             f"crops of side {x.shape[-1]} need a model built with input_size={x.shape[-1]} "
                             f"(python -m training train: --model-arg input_size={x.shape[-1]})")

    def extra_repr(self) -> str:
        return f"size={self.size}, eps={self.eps}, precision={self.precision}"


class LogDCT(_FixedTransform):
    """log(|D·X·Dᵀ| + eps) per channel, D the orthonormal DCT-II matrix of worker.preprocess."""

    name = "dct"

    def _matrices(self) -> dict[str, np.ndarray]:
        d = np.array(dct_matrix(self.size))
        return {"dct": d, "dct_t": d.T}  # (S,S) each

    def _magnitude(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(torch.matmul(torch.matmul(self.dct, x), self.dct_t))  # rows, then columns


class LogFFT(_FixedTransform):
    """log(|F·X·Fᵀ| + eps) per channel, F the orthonormal 2-D DFT written with real cos/sin matrices.

    F·X·Fᵀ = (C - iS) X (C - iS)ᵀ = (CXC - SXS) - i(CXS + SXC) since C and S are symmetric. Equal to
    ``log(abs(np.fft.fft2(x, norm="ortho")) + eps)`` (no fftshift: DC stays at [0, 0], as in the DCT).
    """

    name = "fft"

    def _matrices(self) -> dict[str, np.ndarray]:
        c, s = dft_matrices(self.size)
        # Right factor [C | S] (S,2S); left factor [C; S] (2S,S): two matmuls give all four products.
        return {"right": np.concatenate([c, s], 1), "left": np.concatenate([c, s], 0)}

    def _magnitude(self, x: torch.Tensor) -> torch.Tensor:
        n = self.size
        q = torch.matmul(self.left, torch.matmul(x, self.right))  # (B,3,2S,2S) = [[CXC, CXS], [SXC, SXS]]
        re = q[..., :n, :n] - q[..., n:, n:]
        im = q[..., :n, n:] + q[..., n:, :n]  # sign irrelevant for the magnitude
        return torch.sqrt(re * re + im * im)


class LogDWT(_FixedTransform):
    """One-level 2-D Haar DWT, sub-bands tiled [[LL, LH], [HL, HH]] into S×S, log-magnitude."""

    name = "dwt"

    def _matrices(self) -> dict[str, np.ndarray]:
        w = haar_matrix(self.size)
        return {"haar": w, "haar_t": w.T}

    def _magnitude(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(torch.matmul(torch.matmul(self.haar, x), self.haar_t))


FREQUENCY_TRANSFORMS: dict[str, type[_FixedTransform]] = {"dct": LogDCT, "fft": LogFFT, "dwt": LogDWT}


@torch.no_grad()
def spectrum_stats(
    crops: torch.Tensor | Iterable[torch.Tensor], transform: str = "dct", eps: float = SPECTRUM_EPS,
    precision: str = "float32",
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a transform's output over crops (N,3,S,S) in [0,1], given as one
    tensor or as batches of them (sums in float64, so a large set never sits in memory at once).

    How the MD-CSDNetwork's frequency-branch normalisation constants are made: training computes
    them on its training crops (``training.normalise``); pass them as ``freq_mean=..., freq_std=...``.
    """
    layer: _FixedTransform | None = None
    total = squares = None
    count = 0
    for batch in [crops] if isinstance(crops, torch.Tensor) else crops:
        if layer is None:
            layer = create_transform(transform, batch.shape[-1], eps, precision)
        y = layer(batch.float()).double()  # (N,3,S,S)
        part, part_sq = y.sum(dim=(0, 2, 3)), (y * y).sum(dim=(0, 2, 3))
        total, squares = (part, part_sq) if total is None else (total + part, squares + part_sq)
        count += y.numel() // y.shape[1]
    if total is None or count < 2:
        raise ValueError("spectrum_stats needs at least two pixels of crops")
    mean = total / count
    std = ((squares - count * mean * mean).clamp(min=0) / (count - 1)).sqrt()  # unbiased, as Tensor.std
    return mean.tolist(), std.tolist()


def create_transform(
    name: str, size: int, eps: float = SPECTRUM_EPS, precision: str = "float32"
) -> _FixedTransform:
    """Build a frequency layer by name: "dct", "fft" or "dwt"."""
    try:
        cls = FREQUENCY_TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown frequency transform {name!r}; choose from {sorted(FREQUENCY_TRANSFORMS)}") from None
    return cls(size, eps, precision)
