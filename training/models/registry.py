"""timm-like model registry: ``@register_model`` functions, ``create_model(name, **overrides)``, ``list_models()``.

A registered function takes keyword overrides and returns a built model; :func:`create_model` then
stamps the variant's name on it (``model.architecture``) so ``model.model_config`` =
``{"architecture": name, "kwargs": {...}}`` is a complete recipe for a model card:
``create_model(cfg["architecture"], **cfg["kwargs"])`` rebuilds the same network.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from worker.torch_files import load_tensors

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its function name; a second registration of the name is an error."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is already registered")
    _model_entrypoints[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _model_entrypoints if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    try:
        return _model_entrypoints[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None


def create_model(
    name: str,
    checkpoint_path: str | Path | None = None,
    imagenet_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build variant `name` with constructor overrides (e.g. ``stitches=(0,)``, ``transform="fft"``).

    `checkpoint_path`: a state dict of this model (or ``{"state_dict"|"model": ...}``) to load,
    strictly. `imagenet_path`: classic ImageNet Xception weights for the RGB branch (paper II-C; see
    ``xception.load_imagenet_weights``). Neither is part of ``model_config``.
    """
    model = model_entrypoint(name)(**kwargs)
    if hasattr(model, "architecture"):
        model.architecture = name
    if imagenet_path is not None:
        model.load_rgb_imagenet(imagenet_path)  # type: ignore[operator]
    if checkpoint_path is not None:
        sd = load_tensors(checkpoint_path)  # a wrong file said in one line, as for ImageNet weights
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        model.load_state_dict(sd, strict=True)
    return model
