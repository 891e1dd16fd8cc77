"""The MD-CSDNetwork model package (timm-like): Xception trunk, frequency layers, cross-stitch units,
the two-branch network and a registry of the paper's ablation variants.

    from training.models import create_model, list_models
    model = create_model("mdcsd_tiny")              # (B,3,299,299) in [0,1] -> (B,2) logits, 1 = fake
    model = create_model("mdcsd", stitches=(0,))    # any constructor argument can be overridden
    create_model(model.model_config["architecture"], **model.model_config["kwargs"])  # rebuild
"""
from .cross_stitch import CrossStitch, param_groups, stitch_parameters
from .frequency import FREQUENCY_TRANSFORMS, LogDCT, LogDWT, LogFFT, create_transform, spectrum_stats
from .mdcsd import CLASS_NAMES, FREQ_NORM_DEFAULTS, MDCSDNetwork
from .registry import create_model, is_model, list_models, register_model
from .xception import (
    CLASSIC_PARAMS_WITH_FC,
    CLASSIC_TRUNK_PARAMS,
    STITCH_POINTS,
    Xception,
    convert_classic_state_dict,
    load_imagenet_weights,
)

__all__ = [
    "CLASS_NAMES", "CLASSIC_PARAMS_WITH_FC", "CLASSIC_TRUNK_PARAMS", "CrossStitch", "FREQUENCY_TRANSFORMS",
    "FREQ_NORM_DEFAULTS", "LogDCT", "LogDWT", "LogFFT", "MDCSDNetwork", "STITCH_POINTS", "Xception",
    "convert_classic_state_dict", "create_model", "create_transform", "is_model", "list_models",
    "load_imagenet_weights", "param_groups", "register_model", "spectrum_stats", "stitch_parameters",
]
