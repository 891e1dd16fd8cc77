"""The functions RQ runs, named by stable dotted paths with plain-JSON arguments.

`worker.jobs.moderate_s3_object` is the queue's contract: a non-Python client can enqueue it
(README: "Enqueueing from other languages").
"""
from __future__ import annotations

from rq import get_current_job
from rq.timeouts import JobTimeoutException

from worker import runtime, upload_index
from worker.verdict import summary_of

MODERATE_FUNC = "worker.jobs.moderate_s3_object"


class JobTimedOut(BaseException):
    """RQ's job time limit as DeepfakeWorker raises it. A BaseException, so it passes the pipeline's
    `except Exception` (which turns a bug into an `internal` verdict) and reaches the handler below:
    RQ's own JobTimeoutException, raised mid-moderation, used to end as an `internal` verdict."""


def moderate_s3_object(bucket: str, key: str, frames: int | None = None) -> dict:
    """Moderate s3://bucket/key; the verdict is stored next to the upload, and the job's result is its
    summary (`worker.verdict.summary_of`) or, with DEEPFAKE_RESULT_DETAIL=full, the whole of it."""
    job = get_current_job()
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
        verdict = rt.timeout_verdict(bucket, key, seconds)
    return summary_of(verdict) if rt.settings.result_detail == "summary" else verdict
