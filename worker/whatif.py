"""What a changed threshold, review band or rule would do to the uploads already moderated, read from
their stored verdicts without scoring anything again (`deepfake what-if`).

Each scored verdict keeps its tracks' frame scores, so `DecisionPolicy.redecide` gives its label and
action under another policy exactly as the worker would have. Per model (scores of different models
are not comparable): how many uploads each action would get, which moves between actions, and, on
the uploads a reviewer labelled (`deepfake feedback`), each action's reviewer labels now and then.
That is the review team's workload and what it would catch, measured on production traffic before
the setting is changed.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any, Callable

from worker.decision import DecisionPolicy
from worker.feedback import ACTIONS, LABELS, labels_by_action, model_label
from worker.feedback import SUFFIX as FEEDBACK_SUFFIX
from worker.s3 import S3Location
from worker.settings import Settings
from worker.verdict_store import VerdictStore, input_etag


def _tally() -> dict[str, Any]:
    return {"scored": 0, "actions": {"current": dict.fromkeys(ACTIONS, 0), "proposed": dict.fromkeys(ACTIONS, 0)},
            "moves": defaultdict(int),
            "reviewed": {"current": labels_by_action(), "proposed": labels_by_action()}}


def what_if(bucket: str, prefix: str = "", changes: dict[str, Any] | None = None, *,
            settings: Settings | None = None, s3_client: Any = None, since: dt.datetime | None = None,
            on_listed: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The actions the stored scored verdicts under s3://bucket/prefix have and would have with
    `changes` (any of DecisionPolicy.KEY_FIELDS) put over each one's own policy; `skipped` counts the other
    verdicts (no_face and error ones, which no threshold decides, and any from before verdicts
    recorded their policy). `since`: only verdicts (and feedback) written at or after it. A change
    that makes no valid policy (a review threshold above the threshold) raises ValueError."""
    changes = dict(changes or {})
    unknown = set(changes) - set(DecisionPolicy.KEY_FIELDS)
    if unknown:
        raise ValueError(f"unknown policy fields {sorted(unknown)}; expected some of {DecisionPolicy.KEY_FIELDS}")
    settings = settings or Settings()
    store = VerdictStore.for_settings(settings, s3_client)
    models: dict[str, dict[str, Any]] = defaultdict(_tally)
    # verdict key → (label, the ETag of the bytes judged); a feedback object lists just before its verdict
    reviewer_labels: dict[str, tuple[str, Any]] = {}
    skipped = 0
    for key, body in store.scan(S3Location(bucket, prefix), suffixes=(".json",), since=since, on_listed=on_listed):
        if not isinstance(body, dict):
            continue  # not an object this system wrote
        if key.endswith(FEEDBACK_SUFFIX):
            if body.get("label") in LABELS:
                judged = body["verdict"].get("etag") if isinstance(body.get("verdict"), dict) else None
                reviewer_labels[key[: -len(FEEDBACK_SUFFIX)] + ".json"] = (body["label"], judged)
            continue
        label, judged = reviewer_labels.pop(key, (None, None))
        etag = input_etag(body)
        if judged is not None and etag is not None and judged != etag:
            label = None  # a label on the bytes the upload held before it was replaced: not on these
        policy_now = (body.get("decision") or {}).get("policy") or {}
        scored = body.get("status") == "ok" and body.get("action") in ACTIONS
        if not scored or not DecisionPolicy.names_a_policy(policy_now):
            skipped += 1  # not scored (no_face, error: no threshold decides it), or from before policies
            continue
        _, proposed, _ = DecisionPolicy.from_key(policy_now, **changes).redecide(body)
        model = body.get("model") or {}
        tally = models[model_label(model)]
        current = body["action"]
        tally["scored"] += 1
        tally["actions"]["current"][current] += 1
        tally["actions"]["proposed"][proposed] += 1
        if proposed != current:
            tally["moves"][f"{current}→{proposed}"] += 1
        if label is not None:
            tally["reviewed"]["current"][current][label] += 1
            tally["reviewed"]["proposed"][proposed][label] += 1
    return {
        "source": f"s3://{bucket}/{prefix}", "changes": changes, "skipped": skipped,
        "models": [{"model": name, **tally, "moves": dict(sorted(tally["moves"].items()))}
                   for name, tally in sorted(models.items())],
    }
