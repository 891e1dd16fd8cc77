"""A moderator's report for one verdict: a self-contained HTML page with PNG images beside it.

Shows why a video was flagged: the score over time per face track, the face crops with the highest
and lowest scores, a Grad-CAM heatmap per branch (RGB, frequency) on the most suspicious crops (as
the paper's Fig. 3), and a crop's log-DCT spectrum beside a real-face reference (the paper's Fig. 1).
Charts are drawn with OpenCV so the worker needs no plotting library.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from worker.preprocess import crops_to_tensor_layout, log_dct_spectrum
from worker.shown_text import visible

# The page's one script (it counts the images that loaded, for the rendering test) and the policy
# that allows it alone: whatever text of an upload's reaches the page (its key, FFmpeg's messages) is
# escaped, and were an escape ever missed, no other script, frame, form or outside request would run.
LOAD_COUNTER = ('window.addEventListener("load",()=>{const imgs=[...document.images];'
                'document.body.dataset.images=imgs.length;'
                'document.body.dataset.loaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;});')
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
       f"script-src 'sha256-{base64.b64encode(hashlib.sha256(LOAD_COUNTER.encode()).digest()).decode()}'")
TRACK_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _shown(value: object) -> str:
    """A value of the verdict's as page text: escaped for HTML, its non-printable characters shown."""
    return html.escape(visible(str(value)))


def _png(path: Path, rgb: np.ndarray) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return path.name


def score_chart(tracks: list[dict], faces: list[dict], threshold: float, duration: float,
                size: tuple[int, int] = (720, 300)) -> np.ndarray:
    """Fake score (0–1) against time, one line per track, the threshold dashed."""
    w, h = size
    left, right, top, bottom = 50, 20, 20, 40
    img = np.full((h, w, 3), 255, np.uint8)
    pw, ph = w - left - right, h - top - bottom
    duration = max(duration, 1e-3)

    def xy(t: float, s: float) -> tuple[int, int]:
        return int(left + pw * t / duration), int(top + ph * (1.0 - s))

    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    for s in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{s:.1f}", (8, xy(0, s)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for i in range(11):
        t = duration * i / 10
        cv2.putText(img, f"{t:.1f}", (xy(t, 0)[0] - 10, h - 22), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    cv2.putText(img, "time (s)", (w // 2 - 25, h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    y = xy(0, threshold)[1]
    for x in range(left, left + pw, 12):
        cv2.line(img, (x, y), (min(x + 6, left + pw), y), (120, 120, 120), 1)
    by_frame = {f["frame"]: f["t"] for f in faces}
    for track in tracks:
        colour = TRACK_COLOURS[track["id"] % len(TRACK_COLOURS)]
        times = [by_frame.get(fr, 0.0) for fr in track["frames"]][: len(track["frame_scores"])]
        points = [xy(t, s) for t, s in zip(times, track["frame_scores"])]
        if len(points) > 1:
            cv2.polylines(img, [np.array(points, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        if points:
            cv2.putText(img, f"track {track['id']}", (points[-1][0] - 40, max(12, points[-1][1] - 8)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1)
    return img


def spectrum_image(crop: np.ndarray, size: int = 256) -> np.ndarray:
    """The crop's log-DCT spectrum (mean over channels), low frequencies top-left, as a colour map."""
    spec = log_dct_spectrum(crops_to_tensor_layout(crop[None])[0]).mean(axis=0)
    lo, hi = np.percentile(spec, 1), np.percentile(spec, 99.5)
    norm = np.clip((spec - lo) / max(hi - lo, 1e-6), 0, 1)
    coloured = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    return cv2.cvtColor(cv2.resize(coloured, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def grad_cam(model: torch.nn.Module, crop: np.ndarray) -> dict[str, np.ndarray]:
    """Grad-CAM of the fake-vs-real logit on each branch's last feature map, as H×W maps in [0, 1]."""
    x = torch.from_numpy(crops_to_tensor_layout(crop[None]))
    model = model.eval()
    with torch.enable_grad():
        logits, feats = model(x, return_features=True)
        stages = sorted(k for k in feats if "_stage" in k)
        last = {}
        for branch in ("rgb", "freq"):
            keys = [k for k in stages if k.startswith(branch + "_stage")]
            if keys:
                last[branch] = feats[max(keys, key=lambda k: int(k.rsplit("stage", 1)[1]))]
        if not last:
            return {}
        target = (logits[:, 1] - logits[:, 0]).sum()
        grads = torch.autograd.grad(target, list(last.values()), allow_unused=True)
    out = {}
    for (branch, fmap), grad in zip(last.items(), grads):
        if grad is None:
            continue
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * fmap).sum(dim=1))[0].detach().float().numpy()
        cam = cv2.resize(cam, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_LINEAR)
        out[branch] = cam / cam.max() if cam.max() > 0 else cam
    return out


def overlay(crop: np.ndarray, cam: np.ndarray) -> np.ndarray:
    heat = cv2.cvtColor(cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (0.55 * crop + 0.45 * heat).astype(np.uint8)


def write_report(verdict: dict, out_dir: Path, crops: dict[int, np.ndarray], *, model: torch.nn.Module | None,
                 reference: np.ndarray | None = None, top_k: int = 3) -> Path:
    """Write `out_dir/index.html` (+ PNGs and verdict.json) and return the page's path.

    `crops` maps a face's index in `verdict["faces"]` to its model input crop; `reference` is a real
    face crop whose spectrum is shown for comparison.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "verdict.json").write_text(json.dumps(verdict, indent=1))
    faces = verdict.get("faces") or []
    scored = sorted((i for i in crops if faces[i]["fake_score"] is not None), key=lambda i: -faces[i]["fake_score"])
    parts: list[str] = []
    threshold = verdict.get("threshold") or 0.5
    duration = (verdict.get("video") or {}).get("duration_s") or 0.0
    if verdict.get("tracks"):
        name = _png(out_dir / "scores.png", score_chart(verdict["tracks"], faces, threshold, duration))
        parts.append(f'<h2>Fake score over time</h2><img src="{name}" alt="score over time per track">')
    if scored:
        def strip(title: str, indices: list[int], prefix: str) -> str:
            cells = []
            for rank, i in enumerate(indices):
                name = _png(out_dir / f"{prefix}_{rank}.png", crops[i])
                f = faces[i]
                cells.append(f'<figure><img src="{name}" alt="{prefix} crop {rank}"><figcaption>t={f["t"]:.2f} s, '
                             f'track {f.get("track", "–")}, score {f["fake_score"]:.3f}</figcaption></figure>')
            return f"<h2>{title}</h2><div class=row>{''.join(cells)}</div>"

        parts.append(strip("Most suspicious faces", scored[:top_k], "top"))
        parts.append(strip("Least suspicious faces", scored[::-1][:top_k], "bottom"))
        if model is not None:
            cells = []
            for rank, i in enumerate(scored[:top_k]):
                for branch, cam in grad_cam(model, crops[i]).items():
                    name = _png(out_dir / f"gradcam_{branch}_{rank}.png", overlay(crops[i], cam))
                    cells.append(f'<figure><img src="{name}" alt="Grad-CAM {branch} {rank}"><figcaption>{branch} '
                                 f'branch, score {faces[i]["fake_score"]:.3f}</figcaption></figure>')
            if cells:
                parts.append(f"<h2>Grad-CAM per branch</h2><div class=row>{''.join(cells)}</div>")
        spec_cells = [f'<figure><img src="{_png(out_dir / "spectrum_top.png", spectrum_image(crops[scored[0]]))}" '
                      f'alt="spectrum of the most suspicious crop"><figcaption>most suspicious crop '
                      f'(score {faces[scored[0]]["fake_score"]:.3f})</figcaption></figure>']
        if reference is not None:
            spec_cells.append(f'<figure><img src="{_png(out_dir / "spectrum_reference.png", spectrum_image(reference))}" '
                              f'alt="real reference spectrum"><figcaption>real-face reference</figcaption></figure>')
        parts.append(f"<h2>log-DCT spectrum</h2><div class=row>{''.join(spec_cells)}</div>")
    summary = {k: verdict.get(k) for k in ("source", "status", "label", "action", "score", "threshold")}
    summary["review_threshold"] = (verdict.get("decision") or {}).get("review_threshold")
    if verdict.get("error"):
        summary["error"] = f"{verdict['error']['code']}: {verdict['error']['message']}"
    model_block = verdict.get("model") or {}
    rows = "".join(f"<tr><th>{_shown(k)}</th><td>{_shown(v)}</td></tr>" for k, v in summary.items())
    warning = f'<p class=warn>{html.escape(model_block["warning"])}</p>' if model_block.get("warning") else ""
    action = f' <span class="action action-{html.escape(summary["action"])}">{html.escape(summary["action"])}</span>' \
        if summary.get("action") else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>Deepfake report: {_shown(summary['source'])}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} .row{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0}} figcaption{{font-size:12px}} img{{max-width:100%}} th{{text-align:left;padding-right:12px}}
.warn{{color:#a00}} .label-fake{{color:#b00}} .label-real{{color:#070}}
.action{{font-size:60%;padding:2px 8px;border-radius:4px;vertical-align:middle;color:#fff;background:#070}}
.action-review{{background:#c80}} .action-block{{background:#b00}}</style></head>
<body><h1>Deepfake report <span class="label-{html.escape(str(summary['label']))}">{html.escape(str(summary['label'] or summary['status']))}</span>{action}</h1>
<table>{rows}<tr><th>model</th><td>{html.escape(str(model_block.get('name')))} {html.escape(str(model_block.get('version')))}
({html.escape(str(model_block.get('backend')))})</td></tr></table>{warning}
{''.join(parts)}
<p><a href="verdict.json">verdict.json</a></p>
<script>{LOAD_COUNTER}</script>
</body></html>"""
    page_path = out_dir / "index.html"
    page_path.write_text(page)
    return page_path
