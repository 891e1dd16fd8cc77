"""Reviewer feedback: what a person decided about an upload the worker scored, kept beside its
verdict, and how the worker's actions fare against those decisions.

The review band sends uncertain uploads to people; their decisions (and appeals, and spot checks
of allowed uploads) are the only production ground truth. `record` stores one next to the verdict
(`<verdict path>.feedback.json`, schema `deepfake-feedback/1`) with the verdict's action, scores,
thresholds and model, so `summarize` can tell, per model, how often a blocked upload was really
fake and what share of reviews found one. The uploads people look at are not a random sample (most
come from the review band), so these are the precision of each action, not the model's error rates.
Uploads the worker could not score but gave an action (a damaged file sent to review, a no-face
upload a user reported) take feedback too, counted apart by status or error code: how often they
turn out fake is what DEEPFAKE_ERROR_ACTIONS should follow.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from typing import Any, Callable

from worker.decision import ALLOW, BLOCK, REVIEW
from worker.s3 import S3Location, validate_location
from worker.settings import Settings
from worker.verdict_store import VerdictStore

SCHEMA = "deepfake-feedback/1"
LABELS = ("fake", "real")
ACTIONS = (BLOCK, REVIEW, ALLOW)
SUFFIX = ".feedback.json"


class NoVerdict(LookupError):
    """Feedback is about a verdict's action: the upload has no verdict stored, or one without an action."""


def record(bucket: str, key: str, label: str, *, reviewer: str | None = None, note: str | None = None,
           settings: Settings | None = None, s3_client: Any = None) -> dict[str, Any]:
    """Store a reviewer's `label` (fake | real) for s3://bucket/key beside its verdict; the record.
    A later decision on the same upload (an appeal) replaces the earlier one."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
    validate_location(bucket, key)
    settings = settings or Settings()
    store = VerdictStore.for_settings(settings, s3_client)
    upload = S3Location(bucket, key)
    verdict, _ = store.get(upload)
    if not verdict:
        raise NoVerdict(f"no verdict stored for {upload.uri}")
    if verdict.get("action") not in ACTIONS:
        code = (verdict.get("error") or {}).get("code")
        raise NoVerdict(f"the verdict stored for {upload.uri} has no action to judge (its status is "
                        f"{verdict.get('status')}{f', {code}' if code else ''}): nothing was decided about the upload")
    # Replaced since: the decision is about other bytes. Deleted since (a confirmed fake taken down)
    # is fine: the verdict is about the last bytes there were.
    if store.describes_current(upload, verdict, gone=None) is False:
        raise NoVerdict(f"the verdict stored for {upload.uri} judged other bytes than the upload's now (replaced "
                        "since): wait until the upload has been scored again")
    decision, model = verdict.get("decision") or {}, verdict.get("model") or {}
    feedback = {
        "schema": SCHEMA, "source": upload.uri, "label": label, "reviewer": reviewer, "note": note,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "verdict": {
            "status": verdict.get("status"), "error": (verdict.get("error") or {}).get("code"),
            "action": verdict.get("action"), "label": verdict.get("label"), "score": verdict.get("score"),
            "decision_score": decision.get("score"), "threshold": verdict.get("threshold"),
            "review_threshold": decision.get("review_threshold"), "created_at": verdict.get("created_at"),
            "etag": (verdict.get("input") or {}).get("etag"),
            "model": _model_id(model),
        },
    }
    if isinstance(verdict.get("shadow"), dict):  # what the candidate model would have done, for its precision
        shadow = verdict["shadow"]
        feedback["shadow"] = {"action": shadow.get("action"), "label": shadow.get("label"), "score": shadow.get("score"),
                              "decision_score": (shadow.get("decision") or {}).get("score"),
                              "model": _model_id(shadow.get("model") or {})}
    loc = store.feedback_location(upload)
    store.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=json.dumps(feedback).encode(),
                            ContentType="application/json")
    return feedback


def labels_by_action() -> dict[str, dict[str, int]]:
    """Reviewer label counts per action, all zero: action → label → n."""
    return {a: dict.fromkeys(LABELS, 0) for a in ACTIONS}


def _model_id(model: dict) -> dict:
    return {k: model.get(k) for k in ("name", "version", "sha256")}


def model_label(model: dict) -> str:
    """How summaries name a model: name, version and the start of its weights' sha256."""
    return f"{model.get('name')} {model.get('version')} ({str(model.get('sha256'))[:12]})"


def _by_action_summary(name: str, by_action: dict[str, dict[str, int]]) -> dict[str, Any]:
    shares = {f"{a}_fake_share": (by_action[a]["fake"] / total if (total := sum(by_action[a].values())) else None)
              for a in ACTIONS}
    return {"model": name, "n": sum(sum(v.values()) for v in by_action.values()), "by_action": by_action, **shares}


def summarize(bucket: str, prefix: str = "", *, settings: Settings | None = None, s3_client: Any = None,
              since: dt.datetime | None = None, on_listed: Callable[[int], None] | None = None) -> dict:
    """Per model: reviewer labels by the worker's action on scored uploads, each action's share of real
    fakes, and (`unscored`) reviewer labels on the others by status or error code; `shadow_models`:
    the same for the shadow models' actions on the scored uploads that had one.

    Feedback lies among the verdicts, one per upload, so a whole bucket is a long listing:
    `on_listed(n)` is told after each page how many objects it held (the CLI's progress bar); `since`
    keeps the feedback recorded at or after it."""
    settings = settings or Settings()
    store = VerdictStore.for_settings(settings, s3_client)
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(labels_by_action)
    shadow_counts: dict[str, dict[str, dict[str, int]]] = defaultdict(labels_by_action)
    unscored: dict[str, dict[str, dict[str, dict[str, int]]]] = defaultdict(dict)  # model → code → action → label
    n = 0
    for _, fb in store.scan(S3Location(bucket, prefix), suffixes=(SUFFIX,), since=since, on_listed=on_listed):
        try:
            action, label, model = fb["verdict"]["action"], fb["label"], fb["verdict"]["model"]
        except (KeyError, TypeError):
            continue  # not a record this module wrote
        if action not in ACTIONS or label not in LABELS:
            continue
        name = model_label(model)
        status = fb["verdict"].get("status", "ok")  # records from before unscored feedback: scored
        if status == "ok":
            counts[name][action][label] += 1
            shadow = fb.get("shadow") or {}
            if shadow.get("action") in ACTIONS:
                shadow_counts[model_label(shadow.get("model") or {})][shadow["action"]][label] += 1
        else:
            why = fb["verdict"].get("error") or status
            unscored[name].setdefault(why, {}).setdefault(action, dict.fromkeys(LABELS, 0))[label] += 1
        n += 1
    models = []
    for name in sorted(set(counts) | set(unscored)):
        summary = _by_action_summary(name, counts[name])
        summary["n"] += sum(sum(c.values()) for by in unscored[name].values() for c in by.values())
        models.append({**summary, "unscored": dict(sorted(unscored[name].items()))})
    shadow_models = [_by_action_summary(name, by_action) for name, by_action in sorted(shadow_counts.items())]
    return {"feedback": n, "source": f"s3://{bucket}/{prefix}", "models": models, "shadow_models": shadow_models}
