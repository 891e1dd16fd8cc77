"""The jobs that failed without a verdict (RQ's failed registry): list them, and put them back on the
queue under the same ids once the cause is fixed (`deepfake failed`, `deepfake requeue`)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from worker import upload_index
from worker.errors import last_line
from worker.queue import connect, get_queue, upload_of
from worker.rq_worker import DeepfakeJob
from worker.settings import Settings

# A failed job given its retries again, its hash kept: RQ's failure set it to expire with the failure
# (failure_ttl) and requeueing keeps that, so a job that waited longer in the queue vanished from it.
# 0 when the hash is gone (a write would leave a stub without expiry in its place).
REARM_FAILED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'retries_left', ARGV[1], 'retry_intervals', ARGV[2])
redis.call('PERSIST', KEYS[1])
return 1
"""


@dataclass
class FailedJob:
    """A job in RQ's failed registry: it ran out of retries, or its worker died, and has no verdict."""

    id: str
    bucket: str | None
    key: str | None
    failed_at: str | None
    error: str  # the exception's last line, e.g. "worker.errors.TransientError: reading s3://... failed: ..."

    def to_dict(self) -> dict:
        return {"job_id": self.id, "bucket": self.bucket, "key": self.key, "failed_at": self.failed_at,
                "error": self.error}


def failed_jobs(*, settings: Settings | None = None, connection: Redis | None = None,
                limit: int | None = None) -> list[FailedJob]:
    """The failed registry's jobs, oldest first by RQ's registry order (what DeepfakeJobsFailed counts)."""
    settings = settings or Settings()
    connection = connection or connect(settings)
    queue = get_queue(connection, settings.queue)
    registry = FailedJobRegistry(queue=queue)
    out: list[FailedJob] = []
    for job_id in registry.get_job_ids(0, -1 if limit is None else limit - 1):
        try:  # DeepfakeJob: a malformed hash (anyone who can write to Redis) is skipped, not a traceback
            job = DeepfakeJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue  # expired between the listing and the fetch
        bucket, key = upload_of(job) or (None, None)
        latest = job.latest_result()
        # RQ sets ended_at when a job raises, not when its worker died (AbandonedJobError): then the
        # failure's result record says when
        ended = job.ended_at or (latest.created_at if latest is not None else None)
        out.append(FailedJob(job.id, bucket, key, ended.isoformat() if ended else None,
                             last_line(latest.exc_string if latest is not None else None)
                             or "failed (no exception recorded)"))
    return out


def requeue_failed(job_ids: list[str] | None = None, *, settings: Settings | None = None,
                   connection: Redis | None = None) -> tuple[list[str], list[str]]:
    """Put failed jobs (all of them when `job_ids` is None) back on the queue under the same ids, with
    `job_retries` retries again; returns (requeued, not in the failed registry or expired from it).
    Each writes its verdict once when it runs, and `deepfake forget` finds it while it waits."""
    settings = settings or Settings()
    connection = connection or connect(settings)
    queue = get_queue(connection, settings.queue)
    registry = FailedJobRegistry(queue=queue, job_class=queue.job_class)
    requeued, missing = [], []
    for job_id in registry.get_job_ids() if job_ids is None else job_ids:
        if job_id not in registry:
            missing.append(job_id)
            continue
        try:  # first: a malformed hash is left to expire with its failure, never made to last
            job = DeepfakeJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            if not connection.exists(Job.key_for(job_id)):
                connection.zrem(registry.key, job_id)  # its hash expired (or was evicted): nothing is left to run
            missing.append(job_id)
            continue
        if not connection.eval(REARM_FAILED, 1, job.key, settings.job_retries, json.dumps(settings.retry_intervals_s())):
            connection.zrem(registry.key, job_id)  # expired since the fetch
            missing.append(job_id)
            continue
        try:
            job = registry.requeue(job_id)
        except (InvalidJobOperation, NoSuchJobError):
            missing.append(job_id)
            continue
        requeued.append(job_id)
        upload = upload_of(job)
        if upload is not None:  # the index expired with the failure
            upload_index.record(connection, *upload, job_id=job.id, ttl_s=settings.result_ttl_s)
    return requeued, missing
