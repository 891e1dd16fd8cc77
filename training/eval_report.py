"""Evaluation reports: results.json, the paper's Markdown tables (Table II per compression, III/IV
cross-dataset) and an ROC curve PNG, from `training.evaluate`'s results."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import roc_auc, roc_curve, video_level


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def results_json(results: dict[str, Any], *, predictions: bool = False) -> dict[str, Any]:
    """Results as JSON-safe data (nan -> null); raw predictions only when asked."""
    res = {k: v for k, v in results.items() if predictions or k != "predictions"}
    return _jsonable(res)


def _fmt(v: float | None, pct: bool) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


def markdown_report(results: dict[str, Any], *, name: str = "model", level: str = "video") -> str:
    """Markdown tables laid out like the paper's: overall, Table I (per manipulation × compression,
    Acc %), Table II (per compression, Acc % and AUC), Table III/IV (per data set, AUC)."""
    lines = [f"## Evaluation: {name}", "",
             f"{results['n_crops']} crops, {results['n_videos']} videos; threshold {results['threshold']:.4g} "
             "(fake when score ≥ threshold); video score = mean of its frame scores.", "",
             "| level | Acc % | AUC | EER % | AP | TPR % | FPR % | real | fake |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lv in ("frame", "video"):
        m = results[lv]
        lines.append(f"| {lv} | {_fmt(m['acc'], True)} | {_fmt(m['auc'], False)} | {_fmt(m['eer'], True)} | "
                     f"{_fmt(m['ap'], False)} | {_fmt(m['tpr'], True)} | {_fmt(m['fpr'], True)} | "
                     f"{m['n_real']} | {m['n_fake']} |")
    if results.get("video_actions"):
        act = results["video_actions"]
        lines += ["", f"### Actions (video level; review from {act['review_threshold']:.4g}, block from "
                  f"{act['threshold']:.4g})", "", "| videos | allow % | review % | block % | n |", "|---|---|---|---|---|"]
        lines += [f"| {kind} | " + " | ".join(_fmt(act[kind][a], True) for a in ("allow", "review", "block"))
                  + f" | {act[kind]['n']} |" for kind in ("real", "fake")]
    if results.get("groups"):
        many = len({g["source"] for g in results["groups"]}) > 1
        heads = [f"{g['source'] + '/' if many else ''}{g['manipulation'] or '?'} {g['compression']}".strip()
                 for g in results["groups"]]
        lines += ["", f"### Per manipulation and compression ({level}-level Acc %, Table I layout)", "",
                  "| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|",
                  f"| {name} | " + " | ".join(_fmt(g[level]["acc"], True) for g in results["groups"]) + " |",
                  f"| {name} (AUC) | " + " | ".join(_fmt(g[level]["auc"], False) for g in results["groups"]) + " |"]
    if results.get("by_compression"):
        heads = [f"{g['source']} {g['compression']}".strip() for g in results["by_compression"]]
        lines += ["", f"### Per compression ({level}-level, Table II layout)", "",
                  "| method | " + " | ".join(f"{h} Acc % | {h} AUC" for h in heads) + " |",
                  "|---" * (2 * len(heads) + 1) + "|",
                  f"| {name} | " + " | ".join(f"{_fmt(g[level]['acc'], True)} | {_fmt(g[level]['auc'], False)}"
                                            for g in results["by_compression"]) + " |"]
    if results.get("by_source"):
        cells = [_table3_cell(results, g, "frame") for g in results["by_source"]]
        lines += ["", "### Per data set (frame-level AUC, Table III/IV layout)", "",
                  "| method | " + " | ".join(f"{g['source'] or '?'}{suffix}" for g, (suffix, _) in
                                            zip(results["by_source"], cells)) + " |",
                  "|---" * (len(cells) + 1) + "|",
                  f"| {name} | " + " | ".join(_fmt(auc, False) for _, auc in cells) + " |"]
    return "\n".join(lines) + "\n"


def _table3_cell(results: dict[str, Any], part: dict[str, Any], level: str) -> tuple[str, float | None]:
    """(header suffix, AUC) of one data set's column: `part` is a by_source entry, or a whole result
    of one data set. Table III scores FF++ "only on the deepfake class": its ``deepfakes_class``."""
    if "source" not in part:
        sources = results.get("by_source", [])
        part = sources[0] if len(sources) == 1 else part
    if "deepfakes_class" in part:
        return " (Deepfakes)", part["deepfakes_class"][level]["auc"]
    return "", part[level]["auc"]


def cross_dataset_table(results_by_dataset: dict[str, dict[str, Any]], *, name: str = "model",
                        level: str = "frame") -> str:
    """Table III/IV: one AUC column per test data set, each from its own :func:`evaluate_scores` result
    (an FF++ cache of several manipulations: its Deepfakes class, as the paper's Table III)."""
    cells = {h: _table3_cell(res, res, level) for h, res in results_by_dataset.items()}
    return "\n".join([
        "| method | " + " | ".join(f"{h}{suffix}" for h, (suffix, _) in cells.items()) + " |",
        "|---" * (len(cells) + 1) + "|",
        f"| {name} | " + " | ".join(_fmt(auc, False) for _, auc in cells.values()) + " |",
    ]) + "\n"


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, size: int = 560,
             title: str = "ROC") -> Path:
    """Draw ROC curves {label: (labels, scores)} to a PNG with OpenCV (no plotting dependency)."""
    import cv2

    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214)]  # BGR
    img = np.full((size, size, 3), 255, np.uint8)
    m0, m1 = 60, 34  # left/bottom and right/top margins
    span = size - m0 - m1

    def pt(fx: float, fy: float) -> tuple[int, int]:
        return int(round(m0 + fx * span)), int(round(size - m0 - fy * span))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for k in range(11):
        v = k / 10
        cv2.line(img, pt(v, 0), pt(v, 1), (230, 230, 230), 1)
        cv2.line(img, pt(0, v), pt(1, v), (230, 230, 230), 1)
        if k % 2 == 0:
            cv2.putText(img, f"{v:.1f}", (pt(v, 0)[0] - 12, size - m0 + 18), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
            cv2.putText(img, f"{v:.1f}", (m0 - 32, pt(0, v)[1] + 4), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.rectangle(img, pt(0, 1), pt(1, 0), (0, 0, 0), 1)
    cv2.line(img, pt(0, 0), pt(1, 1), (150, 150, 150), 1, cv2.LINE_AA)
    cv2.putText(img, "false positive rate (real called fake)", (m0 + 60, size - 18), font, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, title, (m0, 22), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    y_label = np.full((20, span, 3), 255, np.uint8)
    cv2.putText(y_label, "true positive rate (fake caught)", (span // 2 - 130, 14), font, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    img[m1:m1 + span, 6:26] = cv2.rotate(y_label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    for i, (label, (y, s)) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        try:
            fpr, tpr, _ = roc_curve(y, s)
            text = f"{label}: AUC {roc_auc(y, s):.4f}"
        except ValueError:
            continue
        poly = np.array([pt(a, b) for a, b in zip(fpr, tpr)], np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [poly], False, colour, 2, cv2.LINE_AA)
        org = (pt(0.35, 0)[0], pt(0, 0.12)[1] + 20 * i)
        cv2.line(img, (org[0] - 25, org[1] - 4), (org[0] - 5, org[1] - 4), colour, 2, cv2.LINE_AA)
        cv2.putText(img, text, org, font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
    return path


def write_report(results: dict[str, Any], out_dir: str | Path, *, name: str = "model") -> dict[str, Path]:
    """results.json, report.md and roc.png (frame- and video-level curves) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "roc": out / "roc.png"}
    paths["json"].write_text(json.dumps(results_json(results), indent=2) + "\n")
    paths["markdown"].write_text(markdown_report(results, name=name))
    pred = results.get("predictions")
    if pred is not None and len(pred["scores"]):
        vs, vl, _ = video_level(pred["scores"], pred["labels"], pred["video_ids"])
        plot_roc({"frame-level": (pred["labels"], pred["scores"]), "video-level": (vl, vs)}, paths["roc"],
                 title=f"ROC: {name}")
    else:
        del paths["roc"]
    return paths

