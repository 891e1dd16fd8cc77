"""The scheduler each `rq worker deepfake` runs: RQ's, which moves the retries whose backoff wait is
over (`DEEPFAKE_JOB_RETRY_BACKOFF_S`) from the queue's scheduled registry back onto the queue.

RQ forks it from the worker; one scheduler per queue holds the queue's lock and does the work. What
differs from RQ's:
- Every worker starts one (`DeepfakeWorker._start_scheduler`), not only the worker that got the lock:
  the others try for it every 2 minutes (RQ's own retry in the scheduler's loop), so retries go on
  soon after the lock holder dies. RQ's other workers would try at their next maintenance, 10
  minutes or more away.
- Each job moves in one transaction that fails if the registry changed meanwhile: a job is never
  put on the queue twice, not even by a lock holder that stalled past its lock's 61 s (a Redis
  outage) while another took over, nor brought back after `deepfake forget` erased it. A job hash
  that cannot be read (anyone can write to Redis) is dropped from the registry, not fatal.
- It goes on through errors (a Redis outage, a failover's read-only replica): RQ's dies at the
  first one, and its worker starts another only at its next maintenance, if at all.
- The worker starts it before the model loads (`DeepfakeWorker.work`), so the forked process holds
  no model, CUDA context or threads; only a restart after it died forks from a loaded worker.
- It is a daemon process, and ends when its worker is gone: RQ's runs on, holding the lock and
  heartbeating, when the worker was killed (SIGKILL, OOM) outside a container, and a worker that
  exits without stopping it would wait for it forever at interpreter exit.

With no worker running (KEDA at zero), `deepfake status` does its work (`worker.maintenance.release_due_retries`).
"""
from __future__ import annotations

import os
import time
from typing import Any

from redis.exceptions import RedisError, WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.scheduler import ForkProcess, RQScheduler, run
from rq.utils import current_timestamp


class RetryScheduler(RQScheduler):
    """RQ's scheduler with the changes the module describes; `job_class` reads the jobs it moves."""

    _parent_pid: int | None = None

    def __init__(self, *args: Any, job_class: type[Job] = Job, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_class = job_class
        self._failing: set[str] = set()  # jobs whose move failed once, logged once

    def start(self) -> Any:
        """RQ's `start`, as a daemon process that knows its worker's pid."""
        self._parent_pid = os.getpid()
        self._status = self.Status.STARTED
        self._connection = None  # the child makes its own
        self._process = ForkProcess(target=run, args=(self,), name="Scheduler", daemon=True)
        self._process.start()
        return self._process

    def worker_gone(self) -> bool:
        """A new parent means the worker died and this process was re-parented (to init or a subreaper)."""
        return self._parent_pid is not None and os.getppid() != self._parent_pid

    def work(self) -> None:
        """RQ's loop (lock, heartbeat, move what is due, sleep), going on through errors."""
        self._install_signal_handlers()
        born, failing_since = False, None
        while not self._stop_requested:
            if self.worker_gone():
                self.log.warning("Scheduler: worker %s is gone, stopping", self._parent_pid)
                break
            try:
                if not born:
                    self.register_birth()
                    born = True
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
                if failing_since is not None:
                    self.log.info("Scheduler: working again after %.0f s", time.monotonic() - failing_since)
                    failing_since = None
            except Exception as exc:  # noqa: BLE001 - a Redis outage, a read-only replica: try again
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.log.warning("Scheduler: pass failed (%s: %s), retrying each second",
                                     type(exc).__name__, exc)
            time.sleep(self.interval)
        try:
            self.stop()  # releases the lock, so another worker's scheduler takes over at once
        except Exception:  # noqa: BLE001 - Redis down: the lock expires by itself within a minute
            pass

    def enqueue_scheduled_jobs(self) -> int:
        """Move the due jobs of the queues whose lock this scheduler holds onto their queues; returns
        how many moved."""
        self._status = self.Status.WORKING
        if not self._scheduled_job_registries and self._acquired_locks:
            self.prepare_registries()
        moved, failing = 0, set()
        for registry in self._scheduled_job_registries:
            queue = Queue(registry.name, connection=self.connection, serializer=self.serializer,
                          job_class=self.job_class)
            for job_id in registry.get_jobs_to_schedule(current_timestamp()):
                if self._stop_requested:
                    break  # a backlog can be long: stop between jobs, each moved whole or not at all
                try:
                    moved += self.move(registry, queue, job_id)
                except RedisError:
                    raise  # every job would meet it: the pass fails and the loop tries again
                except Exception as exc:  # noqa: BLE001 - this job's own fault: the others still move
                    failing.add(job_id)
                    if job_id not in self._failing:
                        self.log.error("Scheduler: job %s cannot be moved (%s: %s), left where it is",
                                       job_id, type(exc).__name__, exc)
        self._failing = failing  # those still failing: a job moved or erased since is forgotten
        self._status = self.Status.STARTED
        return moved

    def move(self, registry: ScheduledJobRegistry, queue: Queue, job_id: str) -> bool:
        """One due job onto its queue, if it is still in the registry when the move commits."""
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(registry.key)
                if pipe.zscore(registry.key, job_id) is None:
                    return False  # moved or erased by someone else since the listing
                try:
                    job = self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
                    job.to_dict()  # what the move writes back: a field read but not writable (meta: 5) fails here
                except Exception as exc:  # noqa: BLE001 - gone, or a hash nobody can read or write: never runnable
                    if not isinstance(exc, NoSuchJobError):
                        self.log.warning("Scheduler: job %s cannot be read (%s), dropped", job_id, exc)
                    job = None
                pipe.multi()
                if job is not None:
                    queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                pipe.zrem(registry.key, job_id)
                pipe.execute()
                return job is not None
            except WatchError:
                return False  # the registry changed: the next pass looks again
