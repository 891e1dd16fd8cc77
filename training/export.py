"""Write a model directory the worker loads: ``weights.pt``, ``model.onnx`` and the card ``model.json``.

The ONNX graph is the whole model after cropping (normalisation and log-DCT included): input
``crops`` (N,3,S,S) float32 RGB in [0, 1], outputs ``logits`` (N,2) and ``fake_prob`` (N,), batch
axis dynamic, one self-contained file. Export is followed by a parity check against ONNX Runtime
on the probabilities. Everything is written and checked in a staging directory beside the model
directory first: a failed export (files that disagree by more than the tolerance, a card that
does not validate) leaves the model directory as it was.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.run_checks import UsageError
from worker.engine.model_card import CARD_FILE, ModelCard, sha256_file
from worker.preprocess import CropRecipe, crops_to_tensor_layout

WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 18
PARITY_TOL = 1e-4
PARITY_BATCHES = (1, 5)


class OnnxParityError(RuntimeError):
    """PyTorch and ONNX Runtime disagree on the exported model's probabilities."""


def save_model_dir(
    model: nn.Module, out_dir: Path, *, name: str, version: str, architecture: str,
    architecture_kwargs: dict[str, Any] | None = None, trained: bool, input_size: int = 299,
    threshold: float = 0.5, **card_fields: Any,
) -> ModelCard:
    """Save `model`'s state dict (tensors only, loadable with weights_only=True) and its card."""
    card_fields.setdefault("files", {"weights": WEIGHTS_FILE})
    card = ModelCard(  # validated before any file is written
        name=name, version=version, architecture=architecture, architecture_kwargs=architecture_kwargs or {},
        input_size=input_size, threshold=threshold, trained=trained, **card_fields,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / WEIGHTS_FILE)
    card.save(out_dir)
    return card


class _ProbabilityHead(nn.Module):
    """The exported graph: logits and the fake probability, so ONNX consumers need no softmax."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(crops)
        return logits, torch.softmax(logits, dim=1)[:, 1]


def export_onnx(model: nn.Module, path: Path, *, input_size: int, opset: int = ONNX_OPSET) -> Path:
    """Export with the torch.export-based exporter into ONE file (no ``.onnx.data``), dynamic batch."""
    path = Path(path)
    head = _ProbabilityHead(model).eval().cpu()
    example = torch.rand(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices are expected here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(head, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              input_names=["crops"], output_names=["logits", "fake_prob"],
                              dynamic_shapes={"crops": {0: batch}}, opset_version=opset)
    finally:
        quiet.setLevel(level)
    stray = path.with_name(path.name + ".data")
    if stray.exists():
        raise RuntimeError(f"the exporter wrote external data {stray}; the model file must be self-contained")
    return path


def parity_inputs(input_size: int, n: int = 5, seed: int = 0) -> np.ndarray:
    """Image-like uint8 crops (smooth colour fields + texture + noise) for when no real crops are given."""
    rng = np.random.default_rng(seed)
    s = input_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    out = []
    for _ in range(n):
        base = rng.uniform(40, 215, 3)[None, None, :]
        grad = rng.uniform(-60, 60, (2, 3))
        img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
        img += 20 * np.sin(2 * np.pi * (rng.uniform(2, 12) * xx + rng.uniform(2, 12) * yy))[..., None]
        img += rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _as_nchw(crops: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(crops, torch.Tensor):
        crops = crops.detach().cpu().numpy()
    crops = np.asarray(crops)
    if crops.dtype == np.uint8:  # N×S×S×3 as the worker crops them
        return crops_to_tensor_layout(crops)
    return np.ascontiguousarray(crops, dtype=np.float32)  # already (N,3,S,S) in [0,1]


def onnx_parity(model: nn.Module, onnx_path: Path, crops: np.ndarray | torch.Tensor,
                batch_sizes: Iterable[int] = PARITY_BATCHES) -> dict[str, Any]:
    """Max |p_torch - p_onnxruntime| over the fake probabilities of `crops`, per batch size."""
    import onnxruntime as ort

    x = _as_nchw(crops)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    diffs: dict[str, float] = {}
    worst_logit = 0.0
    for b in batch_sizes:
        worst = 0.0
        reps = np.resize(np.arange(len(x)), max(b, len(x)))  # every crop at least once, whole batches
        for i in range(0, len(reps) - b + 1, b):
            batch = x[reps[i:i + b]]
            with torch.no_grad():
                logits = model(torch.from_numpy(batch)).float()
            p_t = torch.softmax(logits, 1)[:, 1].numpy()
            l_o, p_o = sess.run(["logits", "fake_prob"], {"crops": batch})
            worst = max(worst, float(np.abs(p_t.astype(np.float64) - p_o).max()))
            worst_logit = max(worst_logit, float(np.abs(logits.numpy() - l_o).max()))
        diffs[str(b)] = worst
    return {"max_abs_diff_prob": max(diffs.values()), "max_abs_diff_logits": worst_logit,
            "per_batch_size": diffs, "n_crops": int(len(x)),
            "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider"}


def _normalization(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the model does to its [0,1] input, for readers of the card (the graph does it itself)."""
    out: dict[str, Any] = {"applied_by": "the model (inside weights.pt and model.onnx)", "input_range": [0.0, 1.0]}
    for k in ("rgb_mean", "rgb_std", "transform", "freq_mean", "freq_std", "eps"):
        if kwargs.get(k) is not None:
            out[k] = kwargs[k]
    return out


REFERENCE_FILE = "reference_face.png"


def check_replaces(out_dir: Path, name: str, version: str, force: bool = False) -> None:
    """Refuse to export over another model (`export`, `demo-model`): a directory whose card names
    another name or version (or a model.json that is no card) holds some other model a worker may
    serve, not an earlier export of this one, which is replaced freely. `force` replaces it all the same."""
    path = Path(out_dir) / CARD_FILE
    if force or not path.is_file():
        return
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        found = (str(held["name"]), str(held["version"]))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON, not an object, no name
        found = None
    if found == (name, version):
        return
    what = f"model {found[0]} version {found[1]}" if found else "a model.json that is not a model card"
    raise UsageError(f"{out_dir} holds {what}, not {name} version {version}: export into another directory, "
                     "or pass --force to replace it")


def export_model_dir(
    model: nn.Module, out_dir: Path, *, name: str, version: str, trained: bool,
    architecture: str | None = None, architecture_kwargs: dict[str, Any] | None = None,
    input_size: int | None = None, threshold: float = 0.5, operating_point: dict[str, Any] | None = None,
    review_threshold: float | None = None, review_operating_point: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None, training_data: str = "", metrics: dict[str, Any] | None = None,
    onnx: bool = True, parity_crops: np.ndarray | torch.Tensor | None = None, parity_tol: float = PARITY_TOL,
    parity_batch_sizes: Sequence[int] = PARITY_BATCHES, opset: int = ONNX_OPSET,
    reference_face: np.ndarray | None = None, crop_recipe: dict[str, Any] | None = None, **card_fields: Any,
) -> ModelCard:
    """weights.pt + model.onnx (parity-checked) + model.json with sha256 of every file.

    `architecture`/`architecture_kwargs`/`input_size` default to the model's own ``model_config``.
    `calibration` = ``{"real_scores": [...], "target_fpr": 0.01, ...}`` sets the threshold with
    :func:`training.evaluate.threshold_for_fpr` and records the rest as the operating point; with a
    ``"review_fpr"`` (>= target_fpr) it also sets the review threshold, the lower edge of the band of
    scores the worker sends to human review (action `review`), at that FPR on the same reals;
    otherwise `threshold`, `review_threshold` and their operating points are taken as given. `parity_crops` are the inputs of
    the parity check (uint8 N×S×S×3 or float N×3×S×S); real crops are best, image-like synthetic
    ones are used without them. Raises :class:`OnnxParityError` above `parity_tol`.
    `reference_face`: a real training crop (S×S×3 uint8 RGB) the worker's report shows the spectrum of
    beside a scored face's (the paper's Fig. 1). `crop_recipe`: how the training crops were cut
    (default: the model's ``crop_recipe``, which training sets); the worker cuts its crops the same way.
    It replaces whatever model `out_dir` holds: the commands ask :func:`check_replaces` first.
    """
    cfg = getattr(model, "model_config", {"architecture": None, "kwargs": {}})
    architecture = architecture or cfg["architecture"]
    if not architecture:
        raise ValueError("architecture is required for a model without model_config")
    architecture_kwargs = dict(architecture_kwargs if architecture_kwargs is not None else cfg["kwargs"])
    input_size = int(input_size or architecture_kwargs.get("input_size") or getattr(model, "input_size", 299))
    crop_recipe = crop_recipe if crop_recipe is not None else getattr(model, "crop_recipe", None)
    if crop_recipe is not None and (side := CropRecipe.from_dict(crop_recipe).size) != input_size:
        raise ValueError(f"the training crops were {side} px but the model takes {input_size}")  # before any file
    if calibration is not None:
        from training.evaluate import threshold_for_fpr

        cal = dict(calibration)
        real = np.asarray(cal.pop("real_scores"), dtype=np.float64)
        review_fpr = cal.pop("review_fpr", None)
        method = "lowest threshold with FPR <= target on the calibration reals"
        threshold = threshold_for_fpr(real, float(cal["target_fpr"]))
        operating_point = {**cal, "n_real": int(real.size), "achieved_fpr": float(np.mean(real >= threshold)),
                           "method": method}
        if review_fpr is not None:
            if not float(cal["target_fpr"]) <= float(review_fpr) <= 1.0:
                raise ValueError(f"review FPR {review_fpr} must lie between the target FPR {cal['target_fpr']} and 1")
            review_threshold = threshold_for_fpr(real, float(review_fpr))
            review_operating_point = {**cal, "target_fpr": float(review_fpr), "n_real": int(real.size),
                                      "achieved_fpr": float(np.mean(real >= review_threshold)), "method": method}
    out_dir = Path(out_dir).resolve()  # a link to another volume: staged beside where it points
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as staging:
        stage = Path(staging)  # beside out_dir (one filesystem): a failed export leaves out_dir as it was
        model = model.eval().cpu()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, stage / WEIGHTS_FILE)
        files = {"weights": WEIGHTS_FILE}
        extra: dict[str, Any] = {}
        if onnx:
            export_onnx(model, stage / ONNX_FILE, input_size=input_size, opset=opset)
            crops = parity_crops if parity_crops is not None else parity_inputs(input_size)
            parity = onnx_parity(model, stage / ONNX_FILE, crops, parity_batch_sizes)
            parity["tolerance"] = parity_tol
            if not parity["max_abs_diff_prob"] <= parity_tol:
                raise OnnxParityError(f"ONNX Runtime differs from PyTorch by {parity['max_abs_diff_prob']:.3g} "
                                      f"(> {parity_tol:g}) on the fake probability")
            files["onnx"] = ONNX_FILE
            extra["onnx"] = {"opset": opset, "inputs": {"crops": ["batch", 3, input_size, input_size]},
                             "outputs": {"logits": ["batch", 2], "fake_prob": ["batch"]},
                             "exporter": f"torch.onnx dynamo (torch {torch.__version__})", "parity": parity}
        if reference_face is not None:
            import cv2

            cv2.imwrite(str(stage / REFERENCE_FILE), cv2.cvtColor(np.asarray(reference_face, np.uint8),
                                                                 cv2.COLOR_RGB2BGR))
            files["reference_face"] = REFERENCE_FILE
        extra["sha256"] = {f: sha256_file(stage / f) for f in files.values()}
        card = ModelCard(
            name=name, version=version, architecture=architecture, architecture_kwargs=architecture_kwargs,
            input_size=input_size, normalization=_normalization(architecture_kwargs), threshold=threshold,
            operating_point=operating_point, review_threshold=review_threshold,
            review_operating_point=review_operating_point, trained=trained, training_data=training_data,
            metrics=metrics or {}, files=files, crop_recipe=crop_recipe, **extra, **card_fields,
        )
        card.save(stage)
        # Every check passed: the files move in, the card last (a worker loading meanwhile sees the
        # old card's digests disagree), and a graph or reference face the new card does not list goes.
        out_dir.mkdir(exist_ok=True)
        for f in files.values():
            os.replace(stage / f, out_dir / f)
        for stale in {ONNX_FILE, REFERENCE_FILE} - set(files.values()):
            (out_dir / stale).unlink(missing_ok=True)
        os.replace(stage / CARD_FILE, out_dir / CARD_FILE)
    return card


def verify_model_dir(model_dir: Path) -> dict[str, bool]:
    """{file: sha256 matches the card} for every file the card lists a digest for."""
    card = ModelCard.load(model_dir)
    digests = getattr(card, "sha256", None) or {}
    return {f: (Path(model_dir) / f).is_file() and sha256_file(Path(model_dir) / f) == h for f, h in digests.items()}
