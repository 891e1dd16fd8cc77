"""The functions RQ runs, named by stable dotted paths with plain-JSON arguments.

`worker.jobs.moderate_s3_object` is the queue's contract: a non-Python client can enqueue it
(README: "Enqueueing from other languages").
"""
from __future__ import annotations

import threading
from typing import Any

import structlog
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from worker import runtime, upload_index
from worker.verdict import summary_of

MODERATE_FUNC = "worker.jobs.moderate_s3_object"
# The most a timed-out job spends storing its `timeout` verdict. RQ's started registry keeps a job 60 s
# past its limit, and the worker's /healthz calls it healthy as long: the job's entry is extended by
# this much first, so maintenance never takes a job still storing its verdict for an abandoned one.
TIMEOUT_VERDICT_S = 30

log = structlog.get_logger("worker.jobs")


class JobTimedOut(BaseException):
    """RQ's job time limit as DeepfakeWorker raises it. A BaseException, so it passes the pipeline's
    `except Exception` (which turns a bug into an `internal` verdict) and reaches the handler below:
    RQ's own JobTimeoutException, raised mid-moderation, used to end as an `internal` verdict."""


def moderate_s3_object(bucket: str, key: str, frames: int | None = None) -> dict:
    """Moderate s3://bucket/key; the verdict is stored next to the upload, and the job's result is its
    summary (`worker.verdict.summary_of`) or, with DEEPFAKE_RESULT_DETAIL=full, the whole of it."""
    job = get_current_job()
    try:
        runtime.check_job_arguments(bucket, key, frames)
    except runtime.InvalidJobArguments:
        if job is not None:  # failed at once: 0.4.4 retried it (4 runs over 12 minutes) as if storage had failed
            job.retries_left = None
        raise
    rt = runtime.current()
    if job is not None:  # whoever enqueued it, `deepfake forget` can find it
        upload_index.record(job.connection, bucket, key, job_id=job.id, ttl_s=rt.settings.result_ttl_s)
    enqueued_at = job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None
    final = job is None or not job.retries_left  # the retries left after this attempt: none
    try:
        verdict = rt.moderate_s3(bucket, key, frames=frames, job_id=job.id if job else None, enqueued_at=enqueued_at,
                                 final_attempt=final)
    except (JobTimedOut, JobTimeoutException):
        # The same bytes would time out again: a final verdict, not an RQ retry (enqueueing the
        # upload again starts a new job: a timeout does not answer duplicates). Unless the time went
        # waiting on a slow store and RQ has a retry left.
        seconds = int(job.timeout) if job is not None and job.timeout else 0
        slow = None if final else rt.slow_store(seconds)
        if slow is not None:
            raise slow from None
        if job is not None:
            extend_started(job, TIMEOUT_VERDICT_S)
        try:
            with StorePenalty(TIMEOUT_VERDICT_S):
                verdict = rt.timeout_verdict(bucket, key, seconds)
        except StoreTimedOut:
            verdict = rt.stored  # the bound fell after the write (while it was logged): stored all the same
            if verdict is None:
                log.warning("timeout_verdict_not_stored", job_id=job.id if job else None,
                            source=f"s3://{bucket}/{key}", reason=f"the store did not answer within {TIMEOUT_VERDICT_S} s")
                verdict = rt.timeout_verdict(bucket, key, seconds, store=False)
    return summary_of(verdict) if rt.settings.result_detail == "summary" else verdict


def extend_started(job: Any, seconds: int) -> None:
    """Keep the job's started-registry entries (its running execution) for `seconds` more than RQ's
    60 s: past them, any worker's maintenance takes the job for abandoned and retries or fails it
    while it is still being finished here."""
    try:
        registry = job.started_job_registry
        with job.connection.pipeline() as pipe:
            for execution in job.get_executions():
                if not job.worker_name or execution.worker_name == job.worker_name:
                    execution.heartbeat(registry, seconds + 60, pipe)
            pipe.execute()
    except RedisError as exc:  # the verdict matters more than the registry entry
        log.warning("started_entry_not_extended", job_id=job.id, error=str(exc))


class DeepfakeDeathPenalty(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, raised as JobTimedOut so it ends as a `timeout` verdict."""

    def handle_death_penalty(self, signum: int, frame: Any) -> None:
        if self._exception is JobTimeoutException:
            stop = JobTimedOut(f"Task exceeded maximum timeout value ({self._timeout} seconds)")
            # The upload's reader is stopped here too: the signal may land in PyAV's read or seek
            # callback, which swallows what it raises, and FFmpeg would read on (worker/s3.py).
            source = getattr(runtime.installed(), "source", None)
            if hasattr(source, "cancel"):
                source.cancel(stop)
            raise stop
        super().handle_death_penalty(signum, frame)


class StoreTimedOut(BaseException):
    """Storing a timed-out job's verdict ran past `TIMEOUT_VERDICT_S`. A BaseException: botocore
    wraps an Exception raised mid-request as a retryable HTTPClientError and sends the request again."""


class StorePenalty(UnixSignalDeathPenalty):
    """SIGALRM after `timeout` seconds, raised as StoreTimedOut; on the main thread only (where RQ
    runs jobs): elsewhere nothing is bounded."""

    def __init__(self, timeout: int) -> None:
        super().__init__(timeout, StoreTimedOut)
        self.armed = threading.current_thread() is threading.main_thread()

    def handle_death_penalty(self, signum: int, frame: Any) -> None:
        raise StoreTimedOut(f"storing the verdict took over {self._timeout} s")

    def setup_death_penalty(self) -> None:
        if self.armed:
            super().setup_death_penalty()

    def cancel_death_penalty(self) -> None:
        if self.armed:
            super().cancel_death_penalty()
