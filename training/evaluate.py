"""Metrics and evaluation reports in the paper's terms (section III-B): Acc and AUC, frame- and video-level.

Scores are fake probabilities (class 1 = fake); a crop or video is called fake when
``score >= threshold`` (the worker's rule, ``worker.verdict.label_for``). Video-level scores are the
mean of a video's frame scores, as the paper reports and as the worker aggregates.

Everything is plain numpy (no scikit-learn). Degenerate input: the ranking metrics (AUC, EER, AP)
need both classes and raise ``ValueError`` on one class; :func:`binary_metrics` catches that and
reports ``nan`` (``null`` in JSON) so a per-group table can still be printed.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.run_files import loader_workers

# -- basic metrics -------------------------------------------------------------------------------


def _as_arrays(labels: Iterable[int], scores: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).astype(np.int64).ravel()
    s = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def _need_both(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs both real and fake samples (got {n_neg} real, {n_pos} fake)")
    return n_pos, n_neg


def accuracy(labels: Iterable[int], scores: Iterable[float], threshold: float = 0.5) -> float:
    """Fraction correct with fake = ``score >= threshold``; nan on empty input."""
    y, s = _as_arrays(labels, scores)
    return float(np.mean((s >= threshold).astype(np.int64) == y)) if y.size else math.nan


def roc_auc(labels: Iterable[int], scores: Iterable[float]) -> float:
    """Area under the ROC curve = P(score_fake > score_real) + 0.5 P(tie) (Mann-Whitney U / n1 n0)."""
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = _need_both(y, "ROC AUC")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Mid-ranks (1-based) of each distinct value, so tied scores share their average rank.
    ends = np.cumsum(counts)
    midranks = ends - (counts - 1) / 2.0
    rank_sum = midranks[inverse][y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: Iterable[int], scores: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, highest first, after a leading (0, 0, +inf).

    Point i is the rate of ``score >= thresholds[i]``; tied scores move the curve diagonally.
    """
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = _need_both(y, "ROC curve")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_value = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_value]
    fps = (last_of_value + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s_sorted[last_of_value]]


def eer(labels: Iterable[int], scores: Iterable[float]) -> float:
    """Equal error rate: where FPR = FNR on the (linearly interpolated) ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    d = fnr - fpr  # starts at 1, ends at -1, non-increasing
    i = int(np.nonzero(d <= 0)[0][0])
    if d[i] == 0 or i == 0:
        return float(fpr[i])
    t = d[i - 1] / (d[i - 1] - d[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def average_precision(labels: Iterable[int], scores: Iterable[float]) -> float:
    """AP = sum over distinct thresholds of (R_k - R_{k-1}) P_k (no interpolation; fake = positive)."""
    y, s = _as_arrays(labels, scores)
    n_pos, _ = _need_both(y, "average precision")
    fpr, tpr, _ = roc_curve(y, s)
    n_neg = y.size - n_pos
    tps, fps = tpr[1:] * n_pos, fpr[1:] * n_neg
    precision = tps / np.maximum(tps + fps, 1)
    recall_steps = np.diff(tpr)
    return float(np.sum(recall_steps * precision))


def threshold_for_fpr(real_scores: Iterable[float], target_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on `real_scores` is at most `target_fpr`.

    With the fake rule ``score >= t``, at most ``floor(target_fpr * n)`` real scores may reach t, so t
    is the next float above the (k+1)-th highest real score. Why the lowest: it keeps the most
    true positives for the FPR the operator asked for. Calibrate on validation reals, at the level
    the worker decides on (video scores). Capped at 1.0, where a real score of exactly 1.0 would
    still count as fake.
    """
    s = np.sort(np.asarray(list(real_scores), dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("threshold_for_fpr needs at least one real score")
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    k = int(math.floor(target_fpr * s.size + 1e-9))  # allowed false positives
    if k >= s.size:
        return 0.0
    return float(min(np.nextafter(s[k], np.inf), 1.0))


def binary_metrics(labels: Iterable[int], scores: Iterable[float], threshold: float = 0.5) -> dict[str, Any]:
    """acc, auc, eer, ap, tpr/fpr at `threshold`, and counts; ranking metrics are nan on one class."""
    y, s = _as_arrays(labels, scores)
    pred = s >= threshold
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    out: dict[str, Any] = {
        "n": int(y.size), "n_real": n_neg, "n_fake": n_pos, "threshold": float(threshold),
        "acc": accuracy(y, s, threshold),
        "tpr": float(pred[y == 1].mean()) if n_pos else math.nan,
        "fpr": float(pred[y == 0].mean()) if n_neg else math.nan,
    }
    for name, fn in (("auc", roc_auc), ("eer", eer), ("ap", average_precision)):
        out[name] = fn(y, s) if n_pos and n_neg else math.nan
    return out


def action_rates(labels: Iterable[int], scores: Iterable[float], threshold: float,
                 review_threshold: float) -> dict[str, Any]:
    """The share of real and of fake items the worker's policy would allow, review or block: each
    score judged by ``worker.decision.DecisionPolicy`` itself, so evaluation and serving agree."""
    from worker.decision import ALLOW, BLOCK, REVIEW, DecisionPolicy
    from worker.verdict import label_for

    if review_threshold > threshold:
        raise ValueError(f"review threshold {review_threshold} is above the threshold {threshold}")
    y, s = _as_arrays(labels, scores)
    policy = DecisionPolicy(threshold=float(threshold), review_threshold=float(review_threshold))
    action = np.array([policy.action(label_for(v, policy.threshold), v) for v in s.tolist()], dtype=object)
    out: dict[str, Any] = {"threshold": float(threshold), "review_threshold": float(review_threshold)}
    for name, cls in (("real", 0), ("fake", 1)):
        picked = action[y == cls]
        out[name] = {a: float(np.mean(picked == a)) if picked.size else math.nan for a in (ALLOW, REVIEW, BLOCK)}
        out[name]["n"] = int(picked.size)
    return out


def video_level(
    scores: Sequence[float], labels: Sequence[int], video_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean frame score per video (paper III-B), in order of first appearance; a video's crops must share a label."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = defaultdict(int)
    vlabel: dict[str, int] = {}
    for s, y, v in zip(scores, labels, video_ids, strict=True):
        if vlabel.setdefault(v, int(y)) != int(y):
            raise ValueError(f"video {v!r} has crops with both labels")
        sums[v] = sums.get(v, 0.0) + float(s)
        counts[v] += 1
    ids = list(sums)
    return (np.array([sums[v] / counts[v] for v in ids], dtype=np.float64),
            np.array([vlabel[v] for v in ids], dtype=np.int64), ids)


# -- model evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def predict_dataset(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: str | torch.device = "cpu",
    num_workers: int | None = None, progress: bool = True, desc: str = "evaluate",
) -> dict[str, Any]:
    """Fake probabilities for every item of a (x, label, video_id) dataset, in dataset order.
    `num_workers` None: the device's default (:func:`training.run_files.loader_workers`)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)  # a checkpoint or engine model loads on the CPU
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=loader_workers(num_workers, device), pin_memory=device.type == "cuda")
    scores, labels, vids = [], [], []
    for x, y, v in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        logits = model(x.to(device, non_blocking=True))
        scores.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy().astype(np.float64))
        labels.append(np.asarray(y, dtype=np.int64))
        vids.extend(str(i) for i in v)
    model.train(was_training)
    return {"scores": np.concatenate(scores) if scores else np.zeros(0), "labels": np.concatenate(labels) if labels
            else np.zeros(0, np.int64), "video_ids": vids}


class EngineScorer(nn.Module):
    """A worker engine (`worker.engine.load_engine`) as the module `predict_dataset` calls, so an
    evaluation scores exactly what the worker would (ONNX Runtime, INT8, TensorRT...).

    Crops arrive as the dataset's [0, 1] NCHW floats (uint8 / 255, so ×255 and rounding recovers
    the bytes) and leave as logits [0, logit(p)], whose softmax is the engine's probability p.
    """

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crops = (x.detach().cpu().permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        p = torch.from_numpy(self.engine.predict(crops)).double().clamp(1e-12, 1 - 1e-12)
        return torch.stack([torch.zeros_like(p), torch.log(p) - torch.log1p(-p)], dim=1).float()


def _record_meta(dataset: Dataset) -> list[dict[str, str]] | None:
    """Per-item source/manipulation/compression when the dataset has CropDataset-style ``records``."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    return [{"source": getattr(r, "source", ""), "manipulation": getattr(r, "manipulation", ""),
             "compression": getattr(r, "compression", "")} for r in records]


def _level_metrics(scores: np.ndarray, labels: np.ndarray, vids: Sequence[str], threshold: float) -> dict[str, Any]:
    vs, vl, _ = video_level(scores, labels, vids)
    return {"frame": binary_metrics(labels, scores, threshold), "video": binary_metrics(vl, vs, threshold)}


def evaluate_scores(
    scores: Sequence[float], labels: Sequence[int], video_ids: Sequence[str], *, threshold: float = 0.5,
    review_threshold: float | None = None, meta: Sequence[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Frame- and video-level metrics, plus per-group breakdowns when `meta` (per item) is given.

    With `review_threshold`, ``video_actions`` gives the share of real and fake videos (mean of frame
    scores) that would be allowed, sent to review and blocked (:func:`action_rates`).

    Groups (the paper's tables): ``groups`` = one per (source, manipulation, compression) of the
    fakes, each evaluated against the reals of the same source and compression (Table I);
    ``by_compression`` = all manipulations per compression (Table II); ``by_source`` = everything
    of one data set (cross-dataset AUC, Tables III/IV), FF++ also as ``deepfakes_class`` (its reals
    against its Deepfakes fakes only, Table III's FF++ column) when it holds several manipulations.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    vids = list(video_ids)
    out: dict[str, Any] = {"threshold": float(threshold), "n_crops": int(s.size), "n_videos": len(set(vids)),
                           **_level_metrics(s, y, vids, threshold)}
    if review_threshold is not None:
        vs, vl, _ = video_level(s, y, vids)
        out["video_actions"] = action_rates(vl, vs, threshold, review_threshold)
    if meta is None:
        return out
    src = np.array([m.get("source", "") for m in meta])
    man = np.array([m.get("manipulation", "") for m in meta])
    comp = np.array([m.get("compression", "") for m in meta])

    def subset(mask: np.ndarray, **keys: str) -> dict[str, Any]:
        idx = np.nonzero(mask)[0]
        return {**keys, **_level_metrics(s[idx], y[idx], [vids[i] for i in idx], threshold)}

    fake_keys = sorted({(src[i], man[i], comp[i]) for i in range(s.size) if y[i] == 1})
    out["groups"] = [
        subset((src == a) & (comp == c) & ((y == 0) | (man == m)), source=a, manipulation=m, compression=c)
        for a, m, c in fake_keys
    ]
    out["by_compression"] = [subset((src == a) & (comp == c), source=a, compression=c)
                             for a, c in sorted(set(zip(src.tolist(), comp.tolist())))]
    out["by_source"] = [subset(src == a, source=a) for a in sorted(set(src.tolist()))]
    ffpp_fakes = set(man[(src == "ffpp") & (y == 1)].tolist())
    if "Deepfakes" in ffpp_fakes and len(ffpp_fakes) > 1:  # Table III scores FF++ "only on the deepfake class"
        entry = next(e for e in out["by_source"] if e["source"] == "ffpp")
        entry["deepfakes_class"] = subset((src == "ffpp") & ((y == 0) | (man == "Deepfakes")))
    return out


def evaluate_model(
    model: nn.Module, dataset: Dataset, batch_size: int = 64, *, threshold: float = 0.5,
    review_threshold: float | None = None, device: str | torch.device = "cpu", num_workers: int | None = None,
    progress: bool = True, meta: Sequence[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Score `dataset` and return :func:`evaluate_scores`' results plus the raw predictions (``predictions``).

    Per-group tables use the dataset's ``records`` (``training.data.crops.CropDataset``) unless
    `meta` is given.
    """
    pred = predict_dataset(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                           progress=progress)
    res = evaluate_scores(pred["scores"], pred["labels"], pred["video_ids"], threshold=threshold,
                          review_threshold=review_threshold, meta=meta if meta is not None else _record_meta(dataset))
    res["predictions"] = pred
    return res
