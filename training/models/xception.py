"""Xception (Chollet 2017) with the classic PyTorch state-dict layout, split into stitchable stages.

The module and key names follow Cadene's ``pretrainedmodels.xception`` (the same layout as timm's
``legacy_xception`` and the FaceForensics++ baseline), so ImageNet weights from those projects load
without renaming: ``conv1, bn1, conv2, bn2, block1..block12`` (each ``Block`` with ``skip``,
``skipbn`` and ``rep.N``; a ``SeparableConv2d`` has ``conv1`` = depthwise and ``pointwise``),
``conv3, bn3, conv4, bn4`` and ``fc``. timm cannot be installed beside this project's CPU torch
(see /work/shared/reference/facts.md), hence the copy here.

MD-CSDNetwork (paper section II-B) puts its cross-stitch units "after the max-pooling layers": the
entry-flow blocks 1, 2, 3 and the exit-flow block each end in a stride-2 max-pool, so the trunk is
exposed as five stages whose first four outputs are those stitch points (see :data:`STITCH_POINTS`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from worker.torch_files import load_tensors

#: Channel widths of the classic Xception at width=1.0.
CLASSIC_WIDTHS: dict[str, int] = {
    "stem1": 32, "stem2": 64, "entry1": 128, "entry2": 256, "middle": 728,
    "exit": 1024, "conv3": 1536, "conv4": 2048,
}
#: Names of the four stitch points, in order: outputs of stages 0..3 (blocks 1, 2, 3 and the exit block).
STITCH_POINTS: tuple[str, ...] = ("entry1", "entry2", "entry3", "exit")
#: Parameters of the classic trunk without / with the 1000-class fc (asserted in tests/test_models.py).
CLASSIC_TRUNK_PARAMS = 20_806_952
CLASSIC_PARAMS_WITH_FC = 22_855_952


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """timm/MobileNet channel rounding: nearest multiple of `divisor`, never more than 10 % below `v`."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def scaled_widths(width: float = 1.0) -> dict[str, int]:
    """Channel widths for a width multiplier; exactly the classic widths at 1.0 (all divisible by 8)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return {k: make_divisible(c * width) for k, c in CLASSIC_WIDTHS.items()}


class SeparableConv2d(nn.Module):
    """Depthwise k×k conv (`conv1`) then 1×1 pointwise conv (`pointwise`), both without bias."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
        padding: int = 0, dilation: int = 1, bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                               groups=in_channels, bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, 1, 0, 1, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,Cin,H,W) -> (B,Cout,H',W')
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """Xception residual block: `reps` × (ReLU, SeparableConv 3×3, BN) [+ max-pool] plus a skip path.

    The index layout of `rep` (ReLUs and the max-pool occupy indices too) is the classic one, which is
    what makes ``block1.rep.0.pointwise.weight`` and ``block2.rep.1.conv1.weight`` line up with
    published checkpoints.
    """

    def __init__(
        self, in_filters: int, out_filters: int, reps: int, strides: int = 1,
        start_with_relu: bool = True, grow_first: bool = True,
    ) -> None:
        super().__init__()
        if out_filters != in_filters or strides != 1:
            self.skip: nn.Conv2d | None = nn.Conv2d(in_filters, out_filters, 1, stride=strides, bias=False)
            self.skipbn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_filters)
        else:
            self.skip = None
            self.skipbn = None

        rep: list[nn.Module] = []
        for i in range(reps):
            if grow_first:
                inc = in_filters if i == 0 else out_filters
                outc = out_filters
            else:
                inc = in_filters
                outc = in_filters if i < reps - 1 else out_filters
            # Not in place: the first ReLU sees the block input, which the skip path still needs.
            rep.append(nn.ReLU(inplace=i > 0))
            rep.append(SeparableConv2d(inc, outc, 3, stride=1, padding=1, bias=False))
            rep.append(nn.BatchNorm2d(outc))
        if not start_with_relu:
            rep = rep[1:]
        if strides != 1:
            rep.append(nn.MaxPool2d(3, strides, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:  # (B,Cin,H,W) -> (B,Cout,H/s,W/s)
        x = self.rep(inp)
        if self.skip is not None:
            skip = self.skipbn(self.skip(inp))
        else:
            skip = inp
        return x + skip


class Xception(nn.Module):
    """Xception trunk (optionally with the classic `fc`) with the classic key layout.

    Args:
        num_classes: size of `fc`; 0 builds the trunk without it (the MD-CSDNetwork branches).
        width: channel multiplier; 1.0 is the classic network, smaller values give the reduced-width
            CPU variants (channels rounded to multiples of 8).
        middle_blocks: number of 728-channel middle-flow blocks (classic: 8, named block4..block11).
            The exit block is named ``block{4 + middle_blocks}`` (block12 classically).
    """

    def __init__(self, num_classes: int = 0, width: float = 1.0, middle_blocks: int = 8) -> None:
        super().__init__()
        if middle_blocks < 0:
            raise ValueError("middle_blocks must be >= 0")
        w = scaled_widths(width)
        self.width = width
        self.middle_blocks = middle_blocks
        self.num_classes = num_classes
        self.num_features = w["conv4"]
        self.stage_channels: tuple[int, ...] = (w["entry1"], w["entry2"], w["middle"], w["exit"], w["conv4"])

        # Entry flow. 299 -> conv1 (s2, no pad) 149 -> conv2 (no pad) 147 -> blocks 74, 37, 19.
        self.conv1 = nn.Conv2d(3, w["stem1"], 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(w["stem1"])
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w["stem1"], w["stem2"], 3, bias=False)
        self.bn2 = nn.BatchNorm2d(w["stem2"])
        self.relu2 = nn.ReLU(inplace=True)
        self.block1 = Block(w["stem2"], w["entry1"], 2, 2, start_with_relu=False, grow_first=True)
        self.block2 = Block(w["entry1"], w["entry2"], 2, 2, start_with_relu=True, grow_first=True)
        self.block3 = Block(w["entry2"], w["middle"], 2, 2, start_with_relu=True, grow_first=True)
        # Middle flow: 19x19 at 299 input.
        for i in range(middle_blocks):
            self.add_module(f"block{4 + i}", Block(w["middle"], w["middle"], 3, 1, True, True))
        # Exit flow: 19 -> 10.
        self.exit_block_name = f"block{4 + middle_blocks}"
        self.add_module(self.exit_block_name, Block(w["middle"], w["exit"], 2, 2, True, grow_first=False))
        self.conv3 = SeparableConv2d(w["exit"], w["conv3"], 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(w["conv3"])
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(w["conv3"], w["conv4"], 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(w["conv4"])
        self.relu4 = nn.ReLU(inplace=True)
        self.fc: nn.Linear | None = nn.Linear(w["conv4"], num_classes) if num_classes > 0 else None

        # Stage i = the modules run in order; outputs of stages 0..3 are the max-pooled stitch points.
        self.stage_modules: tuple[tuple[str, ...], ...] = (
            ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "block1"),
            ("block2",),
            ("block3",),
            tuple(f"block{4 + i}" for i in range(middle_blocks)) + (self.exit_block_name,),
            ("conv3", "bn3", "relu3", "conv4", "bn4", "relu4"),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Cadene's init: He-normal-ish convs, BN weight 1 / bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, (2.0 / n) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    @property
    def num_stages(self) -> int:
        return len(self.stage_modules)

    def forward_stage(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Run stage `index` (0..4). At 299 input (width 1): 0 -> (B,128,74,74), 1 -> (B,256,37,37),
        2 -> (B,728,19,19), 3 -> (B,1024,10,10), 4 -> (B,2048,10,10)."""
        for name in self.stage_modules[index]:
            x = getattr(self, name)(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,F,h,w)
        for i in range(self.num_stages):
            x = self.forward_stage(x, i)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:  # (B,F,h,w) -> (B,F) or (B,num_classes)
        x = x.mean(dim=(2, 3))
        return self.fc(x) if self.fc is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_classic_state_dict(
    state_dict: Mapping[str, torch.Tensor], keep_fc: bool = False
) -> dict[str, torch.Tensor]:
    """Normalise a published Xception state dict to this module's layout.

    Handles: a ``module.`` prefix (DataParallel), ``last_linear.*`` (pretrainedmodels renames fc after
    loading), 2-D ``(out, in)`` pointwise weights (the original PyTorch port, e.g. the
    ``xception-b5690688.pth`` file FaceForensics++ loads, stores them squeezed) -> ``(out, in, 1, 1)``,
    and drops ``fc.*`` unless `keep_fc`.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("last_linear."):
            key = "fc." + key[len("last_linear."):]
        if key.startswith("fc.") and not keep_fc:
            continue
        if "pointwise" in key and key.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


def load_imagenet_weights(
    model: Xception, source: str | Path | Mapping[str, torch.Tensor], strict: bool = True
) -> Xception:
    """Load classic ImageNet Xception weights from a local file (or an in-memory state dict).

    Accepted files: Cadene's ``xception-43020ad28.pth``
    (http://data.lip6.fr/cadene/pretrainedmodels/xception-43020ad28.pth, the `pretrainedmodels`
    package's ImageNet weights), its older ``xception-b5690688.pth`` (2-D pointwise weights), or
    timm's ``legacy_xception`` state dict — same keys. No PyPI package ships them; copy the file in.
    Checkpoints wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped. The fc layer
    is loaded only when `model` has one of the same shape.
    """
    if isinstance(source, (str, Path)):
        sd = load_tensors(source)  # ImageNet weights: a wrong file said in one line
    else:
        sd = source
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    sd = convert_classic_state_dict(sd, keep_fc=model.fc is not None)
    model.load_state_dict(sd, strict=strict)
    return model


def xception(num_classes: int = 1000, **kwargs: object) -> Xception:
    """The classic classifier (with the 1000-class fc by default)."""
    return Xception(num_classes=num_classes, **kwargs)  # type: ignore[arg-type]


def count_parameters(module: nn.Module, names: Iterable[str] | None = None) -> int:
    """Number of parameter elements (all, or those whose name contains any of `names`)."""
    total = 0
    for n, p in module.named_parameters():
        if names is None or any(s in n for s in names):
            total += p.numel()
    return total
