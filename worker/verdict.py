"""The verdict: one versioned JSON object per input, whatever happened to it."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from worker import __version__
from worker.errors import ModerationError

SCHEMA = "deepfake-verdict/1"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "verdict.schema.json"  # the JSON Schema integrators validate against


def aggregate_mean(frame_scores: list[float]) -> float:
    """The paper's video score: the mean of the per-frame fake probabilities."""
    return float(sum(frame_scores) / len(frame_scores))


def label_for(score: float, threshold: float) -> str:
    return "fake" if score >= threshold else "real"


def _base(source: str, model: dict | None, threshold: float | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "source": source,
        "status": None,
        "label": None,
        "action": None,
        "score": None,
        "threshold": threshold,
        "error": None,
        "video": None,
        "faces": [],
        "tracks": [],
        "decision": None,
        "model": model,
        "timings_ms": {},
        "worker_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
    }


def ok_verdict(
    source: str, *, score: float, label: str, action: str, threshold: float, video: dict, faces: list[dict],
    tracks: list[dict], decision: dict, model: dict, timings_ms: dict,
) -> dict[str, Any]:
    v = _base(source, model, threshold)
    v.update(status="ok", score=round(score, 6), label=label, action=action, video=video, faces=faces, tracks=tracks,
             decision=decision, timings_ms=timings_ms)
    return v


def no_face_verdict(
    source: str, *, threshold: float, action: str, video: dict, model: dict, timings_ms: dict
) -> dict[str, Any]:
    v = _base(source, model, threshold)
    v.update(status="no_face", action=action, video=video, timings_ms=timings_ms)
    return v


def error_verdict(
    source: str, error: ModerationError, *, action: str | None, threshold: float | None, model: dict | None,
    video: dict | None = None, timings_ms: dict | None = None,
) -> dict[str, Any]:
    """`action`: the decision policy's for this error's code (`DecisionPolicy.error_action`)."""
    v = _base(source, model, threshold)
    v.update(status="error", action=action, error=error.to_dict(), video=video, timings_ms=timings_ms or {})
    return v
