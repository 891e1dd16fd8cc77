"""Job timestamps as other clients write them, read as RQ writes them.

RQ parses a job hash's times with one strptime format (`2026-11-28T12:00:00.000000Z`, or without the
fraction). Other languages' ISO-8601 UTC differs: Go's RFC3339Nano has nine fractional digits,
Python's `isoformat()` and Rust's chrono end in `+00:00`. RQ refused those, so a job enqueued with
them was skipped as malformed: left `queued` for ever, no result, no webhook.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rq.utils import utcformat, utcparse

# The job hash's fields RQ reads as times.
JOB_TIMES = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")


def parse_utc(text: str) -> datetime:
    """A time in RQ's format or any ISO-8601 form with a zone (Z, +00:00, +09:00; up to nanoseconds,
    the digits past microseconds dropped); ValueError for anything else, a time without a zone too."""
    try:
        return utcparse(text)
    except ValueError:
        parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"time {text!r} names no zone (write it in UTC, ending in Z)")
    return parsed.astimezone(timezone.utc)


def in_rq_format(raw: dict[Any, Any]) -> dict[Any, Any]:
    """A job hash (bytes or str keys and values) with its times rewritten in RQ's format; a value that
    is no time is left for RQ to refuse."""
    out = dict(raw)
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        if name not in JOB_TIMES or not value:
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            utcparse(text)
            continue  # RQ's own
        except ValueError:
            pass
        try:
            out[key] = utcformat(parse_utc(text)).encode()
        except ValueError:
            pass
    return out
