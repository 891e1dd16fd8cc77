"""What a worker's maintenance does for its queue, done also where no worker runs: `deepfake status`
(the maintenance CronJob, every 5 minutes, which KEDA may have scaled the workers to zero under)
and `deepfake forget`. Abandoned jobs are moved on and due retries put back on the queue, each under
the lock RQ's workers take for the same work, so that nothing is done twice."""
from __future__ import annotations

import logging
from typing import Any

import structlog
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from worker.scheduler import RetryScheduler

log = structlog.get_logger("worker.maintenance")


def started_registry(queue: Queue) -> StartedJobRegistry:
    """The queue's started registry with the queue's job class, which RQ's registries do not take from
    the queue: its cleanup (run by counting or listing it) handles abandoned jobs and their webhooks."""
    return StartedJobRegistry(queue=queue, job_class=queue.job_class)


def clean_abandoned(queue: Queue) -> bool:
    """Move abandoned jobs on (retried, or failed with their webhooks) under the queue's maintenance
    lock, the one RQ's workers take for the same cleanup: unlocked, two processes cleaning at once
    would each requeue the same job, and it would run twice. Those are the started registry's jobs
    whose worker died, and the jobs stranded in RQ's intermediate list (`recover_stranded`). False
    when another process holds the lock (it is cleaning)."""
    if not queue.acquire_maintenance_lock():
        return False
    try:
        started_registry(queue).cleanup()
        recover_stranded(queue)
    finally:
        queue.release_maintenance_lock()
    return True


class _StandInWorker(SimpleWorker):
    """The worker that RQ's failure handling needs, for a process that is none: never registered,
    and it keeps no counts in a worker hash that nothing would ever expire."""

    def increment_failed_job_count(self, pipeline: Any = None) -> None:
        pass

    def increment_total_working_time(self, job_execution_time: Any, pipeline: Any) -> None:
        pass


def recover_stranded(queue: Queue) -> int:
    """RQ's `IntermediateQueue.cleanup`, which only a worker's maintenance runs: a dequeue whose
    reply was lost (a Redis failover, a worker killed mid-dequeue) leaves its job in the queue's
    intermediate list, where no worker takes it and KEDA does not look. Seen there on two calls a
    minute or more apart, and not started, it is retried (or failed, with its webhooks) as a job
    whose worker died. A job hash that cannot be written back (malformed) is dropped from the list
    and logged, as the scheduler drops one: it would fail every run, and the others go on."""
    intermediate, stand_in, recovered = queue.intermediate_queue, None, 0
    for job_id in intermediate.get_job_ids():
        try:
            if job_id in queue.started_job_registry:
                continue
            job = queue.fetch_job(job_id)
            if job is None:  # gone: nothing to recover
                intermediate.remove(job_id)
            elif not intermediate.set_first_seen(job_id) and intermediate.should_be_cleaned_up(job_id):
                stand_in = stand_in or _StandInWorker([queue], connection=queue.connection,
                                                      job_class=queue.job_class, serializer=queue.serializer)
                stand_in.handle_job_failure(job, queue, exc_string="Job was stuck in intermediate queue.")
                intermediate.remove(job_id)
                recovered += 1
        except RedisError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed job must not stop the queue's maintenance
            intermediate.remove(job_id)
            log.warning("stranded_job_dropped", job_id=job_id, error=f"{type(exc).__name__}: {exc}",
                        reason="it cannot be retried or failed (a malformed job hash)")
    return recovered


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
