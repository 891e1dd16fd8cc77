"""What a worker's maintenance does for its queue, done also where no worker runs: `deepfake status`
(the maintenance CronJob, every 5 minutes, which KEDA may have scaled the workers to zero under)
and `deepfake forget`. Abandoned jobs are moved on and due retries put back on the queue, each under
the lock RQ's workers take for the same work, so that nothing is done twice."""
from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import structlog
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from worker.scheduler import RetryScheduler

log = structlog.get_logger("worker.maintenance")
STRANDED_ERROR = "Job was stuck in intermediate queue."  # RQ's words, as its workers record them
LOCK_TTL_S = 899  # RQ's Queue.acquire_maintenance_lock's
RELEASE_IF_HELD = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def started_registry(queue: Queue) -> StartedJobRegistry:
    """The queue's started registry with the queue's job class, which RQ's registries do not take from
    the queue: its cleanup (run by counting or listing it) handles abandoned jobs and their webhooks."""
    return StartedJobRegistry(queue=queue, job_class=queue.job_class)


@contextmanager
def maintenance_lock(queue: Queue) -> Iterator[bool]:
    """The queue's maintenance lock, the one RQ's workers take to clean, if it is free (yields False
    when another process holds it); released on leaving, whatever failed. Taken as RQ does (the same
    key, for LOCK_TTL_S), but holding a token of its own: a pass that outlived the lock (slow
    webhooks, a Redis ride-out) released it with RQ's plain DEL after another process had taken it,
    and a third then cleaned beside the second, each retrying the same abandoned job."""
    token = uuid.uuid4().hex
    held = bool(queue.connection.set(queue.registry_cleaning_key, token, nx=True, ex=LOCK_TTL_S))
    try:
        yield held
    finally:
        if held:
            queue.connection.eval(RELEASE_IF_HELD, 1, queue.registry_cleaning_key, token)


def clean_abandoned(queue: Queue) -> bool:
    """Move abandoned jobs on (retried, or failed with their webhooks) under the queue's maintenance
    lock, the one RQ's workers take for the same cleanup: unlocked, two processes cleaning at once
    would each requeue the same job, and it would run twice. Those are the started registry's jobs
    whose worker died, and the jobs stranded in RQ's intermediate list (`recover_stranded`). False
    when another process holds the lock (it is cleaning)."""
    with maintenance_lock(queue) as held:
        if held:
            clean_abandoned_locked(queue)
    return held


def clean_abandoned_locked(queue: Queue) -> None:
    """`clean_abandoned`'s work, for a caller that holds the maintenance lock itself (`forget`)."""
    restart_half_retried(queue)
    started_registry(queue).cleanup()
    recover_stranded(queue)


# A job marked `started` again only while it still says `scheduled` in no scheduled registry: checked
# and written at once, so that a job a scheduler moves onto the queue meanwhile is left alone.
RESTART_HALF_RETRIED = """
if redis.call('HGET', KEYS[1], 'status') == 'scheduled' and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('HSET', KEYS[1], 'status', 'started')
  return 1
end
return 0
"""


def restart_half_retried(queue: Queue) -> int:
    """Mark `started` again the jobs that the started registry holds past their time, saying
    `scheduled` in no scheduled registry: a retry whose status was written but not the rest (RQ
    writes it first, on its own; `DeepfakeJob.retry` does not, but a worker before 0.4.2 or an RQ tool
    run without RQ_JOB_CLASS may have). The registry's cleanup, which follows, then retries them as
    abandoned, where it would have dropped their entries and lost them. Returns how many."""
    registry, scheduled, mended = started_registry(queue), queue.scheduled_job_registry, 0
    for job_id in registry.get_expired_job_ids():
        job_key = queue.job_class.key_for(job_id)
        if queue.connection.eval(RESTART_HALF_RETRIED, 2, job_key, scheduled.key, job_id):
            log.warning("half_retried_job_restarted", job_id=job_id, reason="its retry was cut off half written")
            mended += 1
    return mended


# A job seen in the intermediate list, not started, this long after an earlier sighting (RQ's own
# rule) is taken for one whose dequeue reply was lost. A worker cut off from Redis for longer between
# its dequeue and its start may then run it too, as may the retry: the verdict store keeps one verdict.
STRANDED_AFTER_S = 60
FIRST_SEEN_TTL_S = 24 * 3600  # as RQ keeps its marks


class _StandInWorker(SimpleWorker):
    """The worker that RQ's failure handling needs, for a process that is none: never registered, it
    leaves the caller's connection as it is (RQ's would rename it and raise its socket timeout to
    415 s), and keeps no counts in a worker hash that nothing would ever expire."""

    def __init__(self, queue: Queue) -> None:
        super().__init__([queue], connection=queue.connection, job_class=queue.job_class,
                         serializer=queue.serializer, prepare_for_work=False)

    def _set_connection(self, connection: Any) -> Any:
        return connection

    def increment_failed_job_count(self, pipeline: Any = None) -> None:
        pass

    def increment_total_working_time(self, job_execution_time: Any, pipeline: Any) -> None:
        pass


def recover_stranded(queue: Queue, worker: SimpleWorker | None = None) -> int:
    """RQ's `IntermediateQueue.cleanup`, for `deepfake status` and the workers alike: a dequeue whose
    reply was lost (a Redis failover, a worker killed mid-dequeue) leaves its job in the queue's
    intermediate list, where no worker takes it and KEDA does not look. A job there that is nowhere
    else (not on the queue, started, scheduled or failed: `_placed`), found so `STRANDED_AFTER_S`
    before and since it was last enqueued (RQ's marks outlive a job's stay), is retried, or failed
    with its webhooks, through `worker`'s failure handling (a stand-in's when None), as a job whose
    worker died. Its entry comes off the list once that is written (RQ logs and swallows a failed
    write), and so does an entry whose job is gone or placed elsewhere; a job hash that cannot be
    written back (malformed) is dropped and logged, as the scheduler drops one. Returns how many
    jobs were recovered. Under the queue's maintenance lock (its callers'): one process at a time."""
    intermediate, connection, recovered = queue.intermediate_queue, queue.connection, 0
    for job_id in intermediate.get_job_ids():
        try:
            job = queue.job_class.fetch(job_id, connection=connection, serializer=queue.serializer)
            if _placed(queue, job):  # handled already, or a leftover entry (a worker on several queues leaves one)
                _unlist(intermediate, job_id)
                continue
        except NoSuchJobError:  # gone, or malformed (worker.rq_worker.DeepfakeJob.restore)
            _unlist(intermediate, job_id)
            continue
        seen = _first_seen(intermediate, job_id)
        if seen is None or (job.enqueued_at is not None and seen < job.enqueued_at):
            connection.set(intermediate.get_first_seen_key(job_id), now().timestamp(), ex=FIRST_SEEN_TTL_S)
            continue
        if now() - seen < timedelta(seconds=STRANDED_AFTER_S):
            continue  # a worker may be between its dequeue and its start
        try:
            job.to_dict()
        except Exception as exc:  # noqa: BLE001 - a job hash anyone could have written
            _unlist(intermediate, job_id)
            log.warning("stranded_job_dropped", job_id=job_id, error=f"{type(exc).__name__}: {exc}",
                        reason="a malformed job hash: it can be neither retried nor failed")
            continue
        try:
            (worker or _StandInWorker(queue)).handle_job_failure(job, queue, exc_string=STRANDED_ERROR)
            moved = _placed(queue, job)
        except NoSuchJobError:  # erased meanwhile (`deepfake forget`)
            _unlist(intermediate, job_id)
            continue
        except RedisError:
            raise
        except Exception as exc:  # noqa: BLE001 - one job must not stop the rest of the maintenance
            log.warning("stranded_job_not_moved", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            continue
        if not moved:  # RQ logged why (a failed write): the entry stays for the next round
            log.warning("stranded_job_not_moved", job_id=job_id, error="its retry or failure was not written")
            continue
        _unlist(intermediate, job_id)
        log.info("stranded_job_recovered", job_id=job_id, status=job.get_status(refresh=False))
        recovered += 1
    return recovered


def _placed(queue: Queue, job: Any) -> bool:
    """Whether Redis holds the job where its status says: on the queue, or in the started, scheduled
    or failed registry (RQ sets a retry's status before the write that schedules it, which can fail).
    Refreshes the status; NoSuchJobError when the job is gone."""
    try:
        status = job.get_status(refresh=True)
    except InvalidJobOperation as exc:
        raise NoSuchJobError(job.id) from exc
    if status == JobStatus.QUEUED:
        return queue.get_job_position(job.id) is not None
    registry = {JobStatus.STARTED: queue.started_job_registry, JobStatus.SCHEDULED: queue.scheduled_job_registry,
                JobStatus.FAILED: queue.failed_job_registry}.get(status)
    return registry is None or job.id in registry  # finished, stopped, canceled, deferred: not waiting here


def _first_seen(intermediate: Any, job_id: str) -> Any:
    """RQ's mark for a job in the list, None when there is none or it is not a timestamp (forged)."""
    try:
        return intermediate.get_first_seen(job_id)
    except (ValueError, OverflowError, OSError):
        return None


def _unlist(intermediate: Any, job_id: str) -> None:
    intermediate.remove(job_id)
    intermediate.connection.delete(intermediate.get_first_seen_key(job_id))


def release_due_retries(queue: Queue) -> int:
    """Move the retries whose backoff is over from the scheduled registry onto the queue, where KEDA
    sees them and a worker takes them; what a worker's RQ scheduler does every second, for a
    deployment with no worker running (`deepfake status`, which the maintenance CronJob runs). Under
    RQ's scheduler lock for the queue; 0 when a worker's scheduler holds it (it does the same)."""
    scheduler = RetryScheduler([queue.name], connection=queue.connection, serializer=JSONSerializer,
                               job_class=queue.job_class, logging_level=logging.WARNING)  # quiet: one call per status
    if not scheduler.acquire_locks():
        return 0
    try:
        return scheduler.enqueue_scheduled_jobs()
    finally:
        scheduler.release_locks()
