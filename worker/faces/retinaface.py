"""RetinaFace (Deng et al. 2019) in biubug6's "Pytorch_Retinaface" layout.

The module tree and therefore the state-dict keys (`body.*`, `fpn.*`, `ssh1..3.*`, `ClassHead.*`,
`BboxHead.*`, `LandmarkHead.*`) follow biubug6 exactly, so his released `mobilenet0.25_Final.pth`
and `Resnet50_Final.pth` load with `strict=True`. The ResNet-50 body is written here with
torchvision's key names (torchvision is not installable beside this torch), minus `avgpool`/`fc`,
which is what biubug6's `IntermediateLayerGetter` keeps.

Shapes: images are N×3×H×W float BGR minus the mean (104, 117, 123); any H, W. The three pyramid
levels have strides 8, 16, 32 and two anchors per location, A = 2·Σ ceil(H/s)·ceil(W/s) in all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ANCHORS_PER_LOCATION = 2


@dataclass(frozen=True)
class BackboneConfig:
    """What differs between biubug6's `cfg_mnet` and `cfg_re50`."""

    in_channels: tuple[int, int, int]  # channels of the three returned body stages
    out_channels: int  # FPN / SSH width


CONFIGS: dict[str, BackboneConfig] = {
    "mobilenet0.25": BackboneConfig(in_channels=(64, 128, 256), out_channels=64),
    "resnet50": BackboneConfig(in_channels=(512, 1024, 2048), out_channels=256),
}


# --- conv blocks (biubug6 net.py); indices inside each Sequential fix the key names ---------------


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    """3×3 conv → BN → LeakyReLU (keys .0 conv, .1 bn)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv → BN; SSH branches are activated only after their concatenation."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
    )


def conv_bn1x1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    """1×1 conv → BN → LeakyReLU: the FPN lateral projections."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, stride, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """Depthwise 3×3 (keys .0/.1) then pointwise 1×1 (keys .3/.4): a MobileNetV1 block."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


# --- bodies: both return the three feature maps at strides 8, 16, 32 ------------------------------


class MobileNetV1(nn.Module):
    """MobileNetV1 ×0.25 as biubug6 trims it: stage1/2/3 end at strides 8/16/32 (64/128/256 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1),
            conv_dw(8, 16, 1),
            conv_dw(16, 32, 2),
            conv_dw(32, 32, 1),
            conv_dw(32, 64, 2),
            conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            conv_dw(64, 128, 2),
            *(conv_dw(128, 128, 1) for _ in range(5)),
        )
        self.stage3 = nn.Sequential(
            conv_dw(128, 256, 2),
            conv_dw(256, 256, 1),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        return [c1, c2, c3]


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3×3), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Body(nn.Module):
    """torchvision resnet50 up to layer4, returning layer2/3/4 (512/1024/2048 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        layers = [Bottleneck(self._inplanes, planes, stride, downsample)]
        self._inplanes = out
        layers += [Bottleneck(out, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c2, c3, c4]


# --- neck and heads -------------------------------------------------------------------------------


def _leaky_for(channels: int) -> float:
    """biubug6's rule: LeakyReLU(0.1) for the slim MobileNet neck, plain ReLU (slope 0) otherwise."""
    return 0.1 if channels <= 64 else 0.0


class FPN(nn.Module):
    """Top-down feature pyramid: 1×1 laterals, nearest upsampling, 3×3 merges (merge2 runs first)."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        leaky = _leaky_for(out_channels)
        self.output1 = conv_bn1x1(in_channels[0], out_channels, leaky=leaky)
        self.output2 = conv_bn1x1(in_channels[1], out_channels, leaky=leaky)
        self.output3 = conv_bn1x1(in_channels[2], out_channels, leaky=leaky)
        self.merge1 = conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1 = self.output1(feats[0])
        o2 = self.output2(feats[1])
        o3 = self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single-stage context module: 3×3, 5×5 and 7×7 receptive fields (as stacked 3×3s), concatenated."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        if out_channel % 4:
            raise ValueError(f"SSH out_channel must be divisible by 4, got {out_channel}")
        leaky = _leaky_for(out_channel)
        self.conv3X3 = conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_no_relu(out_channel // 4, out_channel // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(self.conv7X7_2(c5_1))], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    """1×1 conv predicting `values` numbers per anchor; N×C×h×w → N×(h·w·anchors)×values."""

    values = 0

    def __init__(self, in_channels: int, num_anchors: int = ANCHORS_PER_LOCATION) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_channels, num_anchors * self.values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class ClassHead(_Head):
    """Background/face logits."""

    values = 2


class BboxHead(_Head):
    """Box offsets (dx, dy, dw, dh) relative to the anchor, in variance units."""

    values = 4


class LandmarkHead(_Head):
    """Five (dx, dy) landmark offsets relative to the anchor centre."""

    values = 10


class RetinaFace(nn.Module):
    """biubug6's RetinaFace for inference: returns (loc N×A×4, conf N×A×2 softmaxed, landms N×A×10)."""

    def __init__(self, backbone: str = "mobilenet0.25") -> None:
        super().__init__()
        if backbone not in CONFIGS:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}; expected one of {sorted(CONFIGS)}")
        self.backbone = backbone
        cfg = CONFIGS[backbone]
        self.body: nn.Module = MobileNetV1() if backbone == "mobilenet0.25" else ResNet50Body()
        self.fpn = FPN(cfg.in_channels, cfg.out_channels)
        self.ssh1 = SSH(cfg.out_channels, cfg.out_channels)
        self.ssh2 = SSH(cfg.out_channels, cfg.out_channels)
        self.ssh3 = SSH(cfg.out_channels, cfg.out_channels)
        self.ClassHead = nn.ModuleList(ClassHead(cfg.out_channels) for _ in range(3))
        self.BboxHead = nn.ModuleList(BboxHead(cfg.out_channels) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(LandmarkHead(cfg.out_channels) for _ in range(3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(images))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        conf = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landms = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, F.softmax(conf, dim=-1), landms
