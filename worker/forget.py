"""Erasure: delete everything this system keeps about one upload, when the platform deletes it (a
user's erasure request, a takedown). Verdicts name the upload and hold its face boxes and landmarks;
reports hold face crops; Redis holds jobs with their results.

`forget` deletes the upload's jobs (waiting, finished, failed: hash, result and registry entries)
and duplicate records from Redis, under the queue's maintenance lock (so that no maintenance retries
a job it is deleting; it waits for the lock, and does without one held over 5 minutes), waits for a
job that is running on it, or was just dequeued, to end (its verdict would otherwise be written
after the erasure), then deletes the stored verdict and report from S3. The
upload itself is the platform's to delete. Log lines name uploads too: their retention is the log
pipeline's.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import as_text

from worker import upload_index
from worker.job_webhooks import undelivered_key
from worker.jobs import MODERATE_FUNC
from worker.maintenance import LOCK_TTL_S, clean_abandoned_locked, maintenance_lock, started_registry
from worker.queue import connect, get_queue
from worker.rq_worker import DeepfakeJob  # reads other clients' times too
from worker.s3 import S3Location, control_client, validate_location
from worker.settings import Settings
from worker.verdict_store import VerdictStore

log = structlog.get_logger("worker.forget")
POLL_S = 1.0
# The queue's maintenance lock is taken for LOCK_TTL_S (worker.maintenance, as RQ's workers do). One
# held longer than STALE_LOCK_S is taken for a dead holder's, and forget deletes without it: a live
# maintenance pass takes seconds, or minutes when abandoned jobs' webhooks time out.
STALE_LOCK_S = 300
# A job in RQ's intermediate list was just dequeued: its worker holds it, and puts it in the started
# registry a moment later. Deleted then, it would still run and store a verdict after the erasure:
# it is waited for as a running job, for this long; one still there after it is a lost dequeue's.
DEQUEUE_GRACE_S = 5.0


@dataclass
class Forgotten:
    upload: str
    jobs_deleted: list[str] = field(default_factory=list)
    still_running: list[str] = field(default_factory=list)  # nothing in S3 was deleted: run it again
    s3_deleted: list[str] = field(default_factory=list)
    s3_remaining: str | None = None  # why verdict objects or older versions may remain in S3: run it again once mended

    @property
    def complete(self) -> bool:
        return not self.still_running and self.s3_remaining is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def _is_for(job: Job, bucket: str, key: str) -> bool:
    try:
        return job.func_name == MODERATE_FUNC and list(job.args[:2]) == [bucket, key]
    except Exception:  # noqa: BLE001 - a job hash anyone could have written
        return False


@dataclass
class Lists:
    """The queue's jobs where they are at one instant: waiting, dequeued (in RQ's intermediate list),
    started, and retries waiting out their backoff (`lists`)."""

    waiting: set[str]
    in_hand: set[str]
    started: set[str]
    scheduled: set[str]

    @property
    def all(self) -> set[str]:
        return self.waiting | self.in_hand | self.started | self.scheduled


def lists(queue: Queue) -> Lists:
    """Read in one transaction: a job moves from list to list (queue, intermediate, started, scheduled,
    queue again), and read one after the other, one moving between two reads was in neither. Without
    RQ's cleanup, which would requeue abandoned jobs outside the workers' lock."""
    with queue.connection.pipeline(transaction=True) as pipe:
        pipe.lrange(queue.key, 0, -1).lrange(queue.intermediate_queue.key, 0, -1)
        pipe.zrange(started_registry(queue).key, 0, -1).zrange(ScheduledJobRegistry(queue=queue).key, 0, -1)
        waiting, in_hand, started, scheduled = pipe.execute()
    return Lists({as_text(j) for j in waiting}, {as_text(j) for j in in_hand},
                 {as_text(m).split(":", 1)[0] for m in started}, {as_text(j) for j in scheduled})


def jobs_for(connection: Redis, queue_name: str, bucket: str, key: str, *, scan: bool = False,
             now: Lists | None = None) -> list[Job]:
    """The upload's jobs: those the index recorded, and any waiting (in RQ's intermediate list too),
    running or waiting to retry that it has not yet (a job a non-Python client enqueued is recorded
    only when a worker starts it), as `now` (`lists`) finds them. `scan` also reads every finished
    and failed job, for jobs older than the index."""
    queue = get_queue(connection, queue_name)
    listed = (now or lists(queue)).all  # a lost dequeue's (intermediate) would be retried by maintenance
    indexed, _ = upload_index.recorded(connection, bucket, key)
    if scan:
        for registry in (FinishedJobRegistry(queue=queue), FailedJobRegistry(queue=queue)):
            listed |= set(registry.get_job_ids(cleanup=False))
    # The index is shared by every queue on this Redis: a job only it names is this queue's when its
    # origin says so (another deployment erases its own); one in this queue's lists is, whatever a raw
    # client wrote as its origin.
    return [job for job in _fetch_all(connection, sorted(indexed | listed)) if _is_for(job, bucket, key)
            and (job.id in listed or job.origin in (queue_name, ""))]


def _fetch_all(connection: Redis, job_ids: list[str], chunk: int = 1000) -> list[Job]:
    """The jobs that exist, fetched in pipelined chunks (a backlog can hold many thousands); a chunk
    with a malformed hash in it is fetched one job at a time, skipping that one."""
    jobs: list[Job] = []
    for start in range(0, len(job_ids), chunk):
        ids = job_ids[start:start + chunk]
        try:
            jobs += [j for j in DeepfakeJob.fetch_many(ids, connection=connection, serializer=JSONSerializer) if j]
            continue
        except Exception:  # noqa: BLE001 - a job hash anyone could have written
            pass
        for job_id in ids:
            try:
                jobs.append(DeepfakeJob.fetch(job_id, connection=connection, serializer=JSONSerializer))
            except Exception:  # noqa: BLE001 - gone, or malformed: not one of ours to judge
                continue
    return jobs


def stale_lock(queue: Queue) -> bool:
    """Whether the maintenance lock has been held longer than STALE_LOCK_S (or never expires)."""
    ttl = queue.connection.ttl(queue.registry_cleaning_key)
    return ttl == -1 or (ttl >= 0 and LOCK_TTL_S - ttl >= STALE_LOCK_S)


def default_wait_s(settings: Settings) -> float:
    """Long enough for any job the settings allow to end: its RQ time limit, and a margin."""
    return settings.job_timeout_s() + 28.0


def forget(
    bucket: str, key: str, *, wait_s: float | None = None, scan: bool = False, settings: Settings | None = None,
    connection: Redis | None = None, s3_client: Any = None, sleep: Callable[[float], None] = time.sleep,
) -> Forgotten:
    """Delete the Redis records and stored S3 verdict and report of s3://bucket/key (see module doc).

    A job running on the upload is waited for, at most `wait_s` (default: the job time limit the
    settings derive plus a margin, `default_wait_s`); if it is still running then, S3 is left alone and
    `still_running` says so.
    `scan` reads every finished and failed job too (once), for jobs enqueued before the index existed.
    """
    validate_location(bucket, key)
    settings = settings or Settings()
    connection = connection or connect(settings)
    s3 = s3_client or control_client(settings.s3_endpoint_url, settings.s3_region)
    out = Forgotten(f"s3://{bucket}/{key}")
    queue = get_queue(connection, settings.queue)
    scheduled_key = ScheduledJobRegistry(queue=queue).key
    deadline = time.monotonic() + (default_wait_s(settings) if wait_s is None else wait_s)
    running: list[str] = []
    dequeued: dict[str, float] = {}  # job id: when first seen in the intermediate list
    warned = False
    while True:
        late = time.monotonic() >= deadline
        with maintenance_lock(queue) as locked:
            # Deleted under the lock, so that no worker's or CronJob's maintenance retries (writes back)
            # a job being deleted; without it only once it looks abandoned, or at the deadline.
            deleting = locked or late or stale_lock(queue)
            if deleting and locked:  # a job whose worker died is not waited for: it is moved on, then deleted
                clean_abandoned_locked(queue)
            elif deleting and not warned:
                log.warning("forget_unlocked", upload=out.upload, reason="stale" if not late else "deadline",
                            note="the queue's maintenance lock stayed taken: deleting without it")
                warned = True
            if deleting:
                now = lists(queue)
                jobs = jobs_for(connection, settings.queue, bucket, key, scan=scan, now=now)
                scan = False  # what finishes while this waits is indexed by the worker that ran it
                at = time.monotonic()
                for job_id in now.in_hand:
                    dequeued.setdefault(job_id, at)
                running = [j.id for j in jobs if j.id in now.started or (
                    j.id in now.in_hand and at - dequeued[j.id] < DEQUEUE_GRACE_S and not late)]
                for job in jobs:
                    if job.id in running:
                        continue
                    if job.id in now.waiting and not late and not connection.lrem(queue.key, 1, job.id):
                        running.append(job.id)  # dequeued since the lists were read: in a worker's hands
                        continue
                    if job.id in now.scheduled and not late and not connection.zrem(scheduled_key, job.id):
                        running.append(job.id)  # a scheduler moved it onto the queue since: looked at again
                        continue  # (taken out first, a move still in flight fails: it watches the registry)
                    job.delete()
                    connection.delete(undelivered_key(job.id))
                    out.jobs_deleted.append(job.id)
        if deleting and (not running or late):
            break
        sleep(POLL_S)
    out.still_running = running
    indexed_jobs, dedupe_keys = upload_index.recorded(connection, bucket, key)
    # Duplicate records that name this queue's jobs, or jobs gone: another queue's live ones stay.
    ours = set(out.jobs_deleted) | set(running)
    gone = set()
    for dkey in dedupe_keys:
        raw = connection.get(dkey)
        target = as_text(raw) if raw is not None else None
        if target is None or target in ours or not Job.exists(target, connection=connection):
            gone.add(dkey)
    if gone:
        connection.delete(*gone)
    forgotten_jobs = {j for j in indexed_jobs if j in out.jobs_deleted or not Job.exists(j, connection=connection)}
    upload_index.remove(connection, bucket, key, job_ids=forgotten_jobs, dedupe_keys=gone)
    if not out.still_running:
        store = VerdictStore.for_settings(settings, s3)
        try:
            _, out.s3_remaining = store.delete(S3Location(bucket, key), out.s3_deleted)
        except (BotoCoreError, ClientError) as exc:
            # Redis is already erased: the record still says what went (0.4.5 printed only the error).
            out.s3_remaining = f"S3 failed part-way ({exc}): the rest of its verdict objects remain; run it again"
            log.warning("forget_s3_failed", upload=out.upload, error=str(exc), deleted=len(out.s3_deleted))
    return out
