"""Backfill: queue every upload already under an S3 prefix, throttled so that live uploads never
wait behind more than `max_queued` backfill jobs.

A deployment starts with a bucket of uploads nobody has checked. `deepfake backfill` lists them
(paged, in key order), skips what is not an upload (folder markers, the workers' own verdicts and
reports, keys the worker refuses), and enqueues the rest through `worker.queue.enqueue`, so a job
already queued or finished, or a verdict already stored, is not computed again. It reports the last
key it handled (queued or skipped), also when it stops part-way: rerun with `start_after`
(`--start-after`) to go on from there.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import structlog
from redis import Redis

from worker.queue import connect, enqueue_upload, get_queue
from worker.s3 import S3Location, control_client, validate_bucket, validate_location
from worker.settings import Settings
from worker.verdict_store import VerdictStore

POLL_S = 1.0  # how often a throttled backfill looks at the queue again
WAIT_LOG_S = 60.0  # a throttled backfill says it is waiting this often (no worker draining: KEDA at zero?)
log = structlog.get_logger("worker.backfill")


@dataclass
class Listed:
    key: str
    etag: str
    skip: str | None  # why it is not queued: folder, verdict, older, invalid_key, unstorable_key; None = an upload


@dataclass
class BackfillStats:
    listed: int = 0
    enqueued: int = 0  # new jobs (what `limit` counts)
    duplicates: int = 0  # uploads an existing job answers for (queued, running or finished before)
    skipped: dict[str, int] = field(default_factory=dict)  # by reason
    waited_s: float = 0.0
    last_key: str | None = None  # the last key handled (queued or skipped): --start-after resumes after it
    stopped: str | None = None  # why the run ended before the listing did: limit, or (the CLI's) a failure

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_prefix(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket`` or ``s3://bucket/prefix``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    validate_bucket(bucket)
    return bucket, prefix


def list_uploads(s3: Any, bucket: str, prefix: str, *, store: VerdictStore, start_after: str | None = None,
                 since: dt.datetime | None = None) -> Iterator[Listed]:
    """Every object under `prefix` in key order, each with why it would be skipped (or None)."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        kwargs["StartAfter"] = start_after
    for page in s3.get_paginator("list_objects_v2").paginate(**kwargs):
        for obj in page.get("Contents", []):
            key, skip = obj["Key"], None
            if key.endswith("/"):
                skip = "folder"
            elif store.is_verdict_key(S3Location(bucket, key)):
                skip = "verdict"
            elif since is not None and obj["LastModified"] < since:
                skip = "older"
            else:
                try:
                    validate_location(bucket, key)
                    if store.unstorable(S3Location(bucket, key)):
                        skip = "unstorable_key"  # too long, or shaped like another upload's report
                except ValueError:
                    skip = "invalid_key"  # the worker would refuse it as access_denied
            yield Listed(key, obj.get("ETag", ""), skip)


def backfill(
    bucket: str, prefix: str = "", *, frames: int | None = None, since: dt.datetime | None = None,
    start_after: str | None = None, limit: int | None = None, max_queued: int | None = None,
    settings: Settings | None = None, connection: Redis | None = None, s3_client: Any = None,
    on_enqueued: Callable[[str, str], None] | None = None, sleep: Callable[[float], None] = time.sleep,
    stats: BackfillStats | None = None,
) -> BackfillStats:
    """Queue the uploads under s3://bucket/prefix (at most `limit` new jobs); before each, wait while
    the queue holds `max_queued` or more waiting jobs. `on_enqueued(key, job_id)` is called for each
    upload queued or answered by an existing job. `stats`, when given, is filled as the run goes, so
    a caller still has it (the key to resume after) when the run raises part-way."""
    settings = settings or Settings()
    connection = connection or connect(settings)
    s3 = s3_client or control_client(settings.s3_endpoint_url, settings.s3_region)
    store = VerdictStore.for_settings(settings, s3)
    queue = get_queue(connection, settings.queue)
    stats = stats if stats is not None else BackfillStats()
    stats.last_key = stats.last_key or start_after
    if limit is not None and limit < 1:
        return stats
    for item in list_uploads(s3, bucket, prefix, store=store, start_after=start_after, since=since):
        stats.listed += 1
        if item.skip:
            stats.skipped[item.skip] = stats.skipped.get(item.skip, 0) + 1
            stats.last_key = item.key
            continue
        waited = 0.0
        while max_queued is not None and queue.count >= max_queued:
            sleep(POLL_S)
            stats.waited_s += POLL_S
            waited += POLL_S
            if waited % WAIT_LOG_S < POLL_S:
                log.info("backfill_waiting", queued=queue.count, max_queued=max_queued, waited_s=waited,
                         note="no room in the queue: are workers draining it?")
        done = enqueue_upload(bucket, item.key, frames=frames, etag=item.etag or None, settings=settings,
                              connection=connection, s3_client=s3)
        if done.new:
            stats.enqueued += 1
        else:
            stats.duplicates += 1
        stats.last_key = item.key
        if on_enqueued is not None:
            on_enqueued(item.key, done.job_id)
        if limit is not None and stats.enqueued >= limit:
            stats.stopped = "limit"
            break  # at once: the next page's listing could fail a finished run
    return stats
