"""The verdict: one versioned JSON object per input, whatever happened to it."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from worker import __version__
from worker.errors import ModerationError
from worker.preprocess import PREPROCESSING_VERSION

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
        "preprocessing_version": PREPROCESSING_VERSION,
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


# A summary lists this many tracks at most: those that decided first (the fake ones, then by score).
SUMMARY_TRACKS = 8


def summary_of(verdict: dict[str, Any], max_tracks: int = SUMMARY_TRACKS) -> dict[str, Any]:
    """The verdict without its per-face evidence, for the queue's job result (DEEPFAKE_RESULT_DETAIL).

    Redis keeps every job's result for DEEPFAKE_RESULT_TTL_S, and the face records and track boxes
    grow with frames × faces (10 KB for a 4 s clip of one face, megabytes for a crowd over 20
    minutes): the summary stays a few kilobytes whatever the video. `detail` counts what was left
    out; the whole verdict is the stored object (`stored_at`, `deepfake verdict`).
    """
    tracks = verdict.get("tracks") or []
    deciding = sorted(tracks, key=lambda tr: (not tr["fake"], tr["score"] is None, -(tr["score"] or 0.0), tr["id"]))
    summary = {k: v for k, v in verdict.items() if k not in ("faces", "tracks")}
    summary["tracks"] = [
        {"id": tr["id"], "start_t": tr["start_t"], "end_t": tr["end_t"], "frames_seen": len(tr["frames"]),
         "frames_scored": len(tr["frame_scores"]), "score": tr["score"], "long_enough": tr["long_enough"],
         "fake": tr["fake"]}
        for tr in deciding[:max_tracks]
    ]
    summary["detail"] = {"level": "summary", "faces": len(verdict.get("faces") or []), "tracks": len(tracks)}
    return summary
