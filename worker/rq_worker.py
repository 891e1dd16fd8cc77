"""`DeepfakeWorker`: what `rq worker deepfake` runs (RQ_WORKER_CLASS=worker.rq_worker.DeepfakeWorker).

- Loads the detector and model once, in the worker process, before the first job, and runs jobs
  in that process (a SimpleWorker: no fork per job, so CUDA state survives and nothing reloads).
- Forces RQ's JSON serializer: a pickled job is never unpickled. And runs only `worker.jobs` functions
  (`DeepfakeJob`): RQ imports and calls whatever dotted path a job names, so without that list a JSON
  job `["os.system", null, ["..."], {}]` written to Redis would run. Callbacks named in a job are never
  imported, and a malformed job hash is skipped instead of stopping the worker. Webhooks go only to
  vetted receivers, with a verdict summary and no traceback (`worker.webhooks`).
- Waits out a full Redis, and rides out a short Redis outage, with the job in hand instead of exiting
  (`worker.redis_client`).
- Serves /metrics and /healthz, and publishes the model and decision policy it runs so enqueuers can deduplicate.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import NoSuchJobError, StopRequested
from rq.job import Job
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now
from rq.worker.base import WorkerStatus

from worker.errors import ConfigurationError, TransientError
from worker.heap import release_free_memory
from worker.jobs import MODERATE_FUNC, DeepfakeDeathPenalty, JobTimedOut  # noqa: F401 - importable from here too
from worker.logging import configure_logging
from worker.maintenance import maintenance_lock, recover_stranded, release_due_retries, restart_half_retried
from worker.metrics import heartbeat_fresh, serve
from worker.preflight import check_webhooks
from worker.redis_client import (connection_url, database_address, ride_out, waiting_for_space,
                                 without_password)
from worker.runtime import InvalidJobArguments, WorkerRuntime, install, valid_frames
from worker.scheduler import RetryScheduler
from worker.settings import Settings, settings_problems, unknown_variables
from worker.signals import exit_on_sigterm
from worker.timestamps import in_rq_format
from worker.job_webhooks import send_job_webhooks


log = structlog.get_logger("worker.rq_worker")

# The only functions a job may name (RQ would import and call any dotted path in a job's payload).
ALLOWED_FUNCS = frozenset({MODERATE_FUNC})


def model_key(queue: str) -> str:
    return f"deepfake:model:{queue}"


MAX_RETRY_INTERVAL_S = 7 * 24 * 3600


def retry_intervals_valid(intervals: Any) -> bool:
    """None, or a non-empty list of finite waits from 0 to MAX_RETRY_INTERVAL_S seconds (what RQ can
    index into and turn into a timedelta)."""
    if intervals is None:
        return True
    return isinstance(intervals, list) and bool(intervals) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= MAX_RETRY_INTERVAL_S for v in intervals)


class RefusedJob(Exception):
    """A job naming code this worker does not run: it fails without anything being imported or called."""


class DeepfakeJob(Job):
    """A job as DeepfakeWorker loads it from Redis, which anyone who can write there controls."""

    def restore(self, raw_data: Any) -> Any:
        # RQ raises ValueError/AssertionError from a bad date or timeout while *dequeueing*, which
        # stops the worker; as NoSuchJobError the job is skipped (and dropped from RQ's intermediate queue).
        try:
            restored = super().restore(in_rq_format(raw_data))  # times as other languages write them too
        except NoSuchJobError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed field
            log.warning("malformed_job_skipped", job_id=self.id, error=f"{type(exc).__name__}: {exc}")
            raise NoSuchJobError(f"malformed job {self.id}: {type(exc).__name__}: {exc}") from exc
        if not retry_intervals_valid(self.retry_intervals):
            # RQ indexes into them when the job fails: `[]` raised IndexError there, and in every later
            # maintenance pass that met the job (each worker's, `deepfake status`): the queue stalled.
            log.warning("malformed_retry_intervals_dropped", job_id=self.id)
            self.retry_intervals = None  # retried at once, as RQ does a job without intervals
        return restored

    def retry(self, queue: Queue, pipeline: Any) -> None:
        """RQ's, less its own write of a waiting retry's status ahead of `pipeline` (which writes it too):
        killed, or failing to write, in between, RQ left the job `scheduled` in the started registry
        alone, whose maintenance drops the entries of jobs not `started`: the job was lost.

        A retry without backoff waits too, due at once (the next scheduler pass, within a second):
        RQ pushed it onto the queue in a transaction without WATCH, which the worker's client runs
        again when Redis loses the reply, and the job was queued twice. Scheduled, it is added in place."""
        interval = self.get_retry_interval() or 0
        assert self.retries_left
        self.retries_left -= 1
        due = rq_now() + timedelta(seconds=interval)
        queue.schedule_job(self, due, pipeline=pipeline)
        log.info("job_retry_scheduled", job_id=self.id, due=due.isoformat(), retries_left=self.retries_left)

    @property
    def func(self) -> Any:
        name = self.func_name
        if name not in ALLOWED_FUNCS or self.instance is not None:
            self.retries_left = None  # it would be refused again
            self.webhooks = []  # and nobody is told at a URL the payload chose
            log.warning("job_refused", job_id=self.id, func=name)
            raise RefusedJob(f"job {self.id} names {name!r}: this worker runs only {', '.join(sorted(ALLOWED_FUNCS))}")
        return super().func

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """RQ's webhooks, sent through `worker.webhooks.deliver`: vetted receiver, summary, signature.
        Outside a worker (`deepfake status`, or `rq info` with RQ_JOB_CLASS set to this class, whose
        registry counts move an abandoned job on and send its webhooks) the settings come from the
        environment, and no model is loaded for it.
        RQ calls this after saving the result, inside the try that fails and retries the job: nothing
        may escape it, or a job with its verdict runs again. Each hook costs up to the webhook timeout
        between jobs, so only a job's first `MAX_WEBHOOKS` are sent."""
        send_job_webhooks(self, status, exc_string)

    # Callbacks are dotted paths in the job's hash too: never imported or called.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


class DeepfakeWorker(SimpleWorker):
    death_penalty_class = DeepfakeDeathPenalty
    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        kwargs["job_class"] = DeepfakeJob
        items = queues if isinstance(queues, (list, tuple)) else [queues]
        names = [q.name if isinstance(q, Queue) else q for q in items]
        if kwargs.get("connection") is None and items and isinstance(items[0], Queue):
            kwargs["connection"] = items[0].connection
        super().__init__(names, *args, **kwargs)
        exit_on_sigterm()  # RQ's handlers come with work(), after the model loads
        ride_out(self.connection)
        self.runtime: WorkerRuntime | None = None
        self._http = None
        self._job_started: float | None = None
        self._job_timeout: float = 0.0
        self._beat: float | None = None

    # -- start-up --------------------------------------------------------------------------------
    def work(self, burst: bool = False, *args: Any, **kwargs: Any) -> bool:
        # Always with RQ's scheduler, which puts retries back on the queue once their backoff is
        # over (`rq worker` starts none without --with-scheduler), started before the model loads.
        kwargs.pop("with_scheduler", None)
        try:
            settings = self.runtime.settings if self.runtime is not None else Settings()
        except ValidationError as exc:  # one line saying which variables, not RQ's traceback and exit 1
            configure_logging()
            log.error("worker_misconfigured", reason=f"invalid settings: {settings_problems(exc)}")
            raise SystemExit(2) from None
        level = kwargs.get("logging_level")  # `rq worker --logging_level` (or -v, -q) over DEEPFAKE_LOG_LEVEL
        if level:
            level = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
            settings = settings.model_copy(update={"log_level": level})
        configure_logging(settings.log_format, settings.log_level)  # before the scheduler forks: its lines too
        kwargs["logging_level"] = settings.log_level
        self._start_scheduler(burst, settings.log_level)
        try:
            self.load_runtime(settings)
            self.publish_model()
            return super().work(burst, *args, with_scheduler=False, **kwargs)
        except ConfigurationError as exc:  # a model that cannot load: one log line, not a traceback
            log.error("worker_misconfigured", reason=str(exc))
            raise SystemExit(2) from None
        finally:  # RQ stops it in teardown, which a failure to load or to register never reaches
            if self.scheduler is not None:
                self.stop_scheduler()

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO", *args: Any) -> None:
        """RQ's with `worker.scheduler.RetryScheduler`, started even when another worker's holds the
        queue's lock: it tries for it every 2 minutes (RQ's waited for the next maintenance, 10+)."""
        self.scheduler = RetryScheduler(self.queues, connection=self.connection, logging_level=logging_level,
                                        serializer=self.serializer, job_class=self.job_class)
        self.scheduler.acquire_locks()
        if not burst:
            self.scheduler.start()
        elif self.scheduler.acquired_locks:  # move what is due once, now
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's; in burst mode (no timeout) a queue found empty gets the retries now due first (a retry
        without backoff waits in the scheduled registry, due at once), so a burst runs them too."""
        while True:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None or timeout is not None or self._stop_requested:
                return result
            if not sum(release_due_retries(queue) for queue in self.queues):
                return None

    def run_maintenance_tasks(self) -> None:
        """RQ's, but not once the worker is stopping. RQ runs it after a job before it looks at the
        stop flag, and a pass over abandoned jobs (each with its webhooks) ate into the grace period
        sized for the job in hand; the other workers and the maintenance CronJob do it. (RQ's would
        also restart the scheduler, stopped on purpose, forking the loaded worker.)"""
        if not self._stop_requested:
            super().run_maintenance_tasks()
            try:
                self.publish_model(only_if_missing=True)
            except RedisError as exc:  # the next pass tries again; duplicates make new jobs meanwhile
                log.warning("model_not_published", error=str(exc))

    def clean_registries(self) -> None:
        """RQ's, with `worker.maintenance.recover_stranded` for RQ's intermediate-list cleanup (the
        maintenance CronJob runs the same), and its lock released whatever fails."""
        for queue in self.queues:
            with maintenance_lock(queue) as held:
                if held:
                    self.log.info("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                    restart_half_retried(queue)
                    clean_registries(queue, self._exc_handlers)
                    worker_registration.clean_worker_registry(queue)
                    recover_stranded(queue, self)
        self.last_cleaned_at = rq_now()

    def _shutdown(self) -> None:
        """RQ's warm-stop signal handler, less two faults. The stop is recorded first: idle, RQ only
        raised StopRequested, an Exception that a handler in its way (a webhook's, RQ's failure
        handling, during maintenance) caught, and the worker went on taking jobs until its pod was
        killed. And nothing is written to Redis from the handler, which runs inside the job: with Redis
        down the write blocked the job for the whole ride-out, then raised inside it (an `internal`
        verdict). RQ's `shutdown_requested_date` is not written."""
        self._stop_requested = True
        if self.get_state() != WorkerStatus.BUSY:
            raise StopRequested()
        log.info("warm_shutdown", reason="SIGTERM: stopping once the job in hand is done")
        if self.scheduler:
            self.stop_scheduler()

    def stop_scheduler(self) -> None:
        """RQ's, with a bound: SIGTERM, then SIGKILL after 5 s. RQ waits without one, from the
        SIGTERM handler, with the job in hand, for a scheduler that may be waiting on Redis (its
        lock then expires by itself within a minute)."""
        process = self.scheduler._process if self.scheduler is not None else None
        if process is None or process.pid is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            log.warning("scheduler_killed", pid=process.pid, reason="did not stop within 5 s of SIGTERM")
            process.kill()
        process.join()

    def publish_model(self, only_if_missing: bool = False) -> None:
        """Tell enqueuers (duplicate matching) and `deepfake status` which model and decision policy
        this worker runs; the last worker to start on a queue is the one named. With `only_if_missing`
        (each maintenance pass), written again where it is gone: a Redis restarted empty lost it, and
        every enqueue made a new job meanwhile (duplicates are matched against it)."""
        if self.runtime is None:
            return
        for q in self.queues:
            self.connection.set(model_key(q.name), json.dumps(self.runtime.published()), nx=only_if_missing)

    def load_runtime(self, settings: Settings | None = None) -> WorkerRuntime:
        if self.runtime is None:
            settings = settings or Settings()
            configure_logging(settings.log_format, settings.log_level)
            ride_out(self.connection, settings.redis_outage_s)
            t0 = time.perf_counter()
            self.runtime = WorkerRuntime(settings)
            install(self.runtime)
            model = self.runtime.model
            shadow = self.runtime.moderator.shadow
            log.info("worker_ready", queues=[q.name for q in self.queues], model=model["name"],
                     backend=model["backend"], sha256=model["sha256"], device=settings.device,
                     shadow_model=shadow.engine.card.name if shadow is not None else None,
                     allowed_buckets=sorted(self.runtime.allowed), load_s=round(time.perf_counter() - t0, 2))
            if model.get("warning"):
                log.warning("model_warning", model=model["name"], reason=model["warning"])
            if database_address(settings.redis_url) != database_address(self.connection):
                log.warning("redis_url_mismatch", worker=connection_url(self.connection),
                            settings=without_password(settings.redis_url),
                            reason="DEEPFAKE_REDIS_URL is not the Redis this worker listens on (RQ_REDIS_URL): "
                            "jobs queued with these settings never reach it (`deepfake check --only rq`)")
            if unknown := unknown_variables():
                log.warning("unknown_settings", names=unknown, reason="no setting reads these DEEPFAKE_* variables "
                            "(misspelt?): they change nothing; the README's settings table lists those read")
            if settings.queue not in {q.name for q in self.queues}:
                log.warning("queue_mismatch", worker=[q.name for q in self.queues], settings=settings.queue,
                            reason=f"DEEPFAKE_QUEUE is {settings.queue!r}, a queue this worker does not listen on: "
                            f"jobs enqueued with these settings wait for a worker started as `rq worker "
                            f"{settings.queue}` (and KEDA's listName rq:queue:{settings.queue})")
            if not (hosts := check_webhooks(settings)).ok:  # a URL or port there: every webhook refused
                log.warning("webhook_hosts_unusable", reason=hosts.detail)
            if not self.runtime.allowed:
                log.warning("no_bucket_allowed", reason="DEEPFAKE_ALLOWED_BUCKETS is empty: every job will be "
                            "refused as access_denied (`deepfake check` lists what else is missing)")
            self.runtime.metrics.model_loaded.set(1)
            self.runtime.metrics.redis_full.set_function(lambda: waiting_for_space(self.connection) or 0.0)
            self.runtime.metrics.watch_queues(self.connection, [q.name for q in self.queues])
            if settings.metrics_port and self._http is None:
                self._http = serve(self.runtime.metrics, self.health, settings.metrics_port)
        return self.runtime

    # -- health ----------------------------------------------------------------------------------
    def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
        beat = super().heartbeat(*args, **kwargs)
        self._beat = time.time()  # once Redis took it: one that failed is no sign of health
        return beat

    def execute_job(self, job: Any, queue: Any) -> Any:
        job.timeout = self.job_limit_s(job)
        self._job_started, self._job_timeout = time.time(), float(job.timeout)
        try:  # every line logged while the job runs names it (the pipeline's, a webhook's, RQ's)
            with structlog.contextvars.bound_contextvars(job_id=job.id):
                return super().execute_job(job, queue)
        finally:
            self._job_started = None
            release_free_memory()  # the job's frames and tensors, kept mapped by glibc while idle (worker/heap.py)
            self._beat = time.time()

    def job_limit_s(self, job: Job) -> int:
        """The job's time limit: at most what the settings derive for the job's frames. A job may ask
        for less, never for more or for none (-1): whoever wrote it to Redis could ask for a day, past
        the pod's grace period and the liveness window, and an enqueuer's settings may be older."""
        settings = self.runtime.settings if self.runtime is not None else Settings()
        try:
            frames = (job.kwargs or {}).get("frames")
        except Exception:  # noqa: BLE001 - malformed data: the job is refused when it runs
            frames = None
        if not valid_frames(frames):
            frames = None  # the job refuses it itself; the limit is the settings' own
        limit = settings.job_timeout_s(frames)
        asked = job.timeout if isinstance(job.timeout, (int, float)) and not isinstance(job.timeout, bool) else 0
        return int(asked) if 0 < asked < limit else limit

    def handle_exception(self, job: Job, *exc_info: Any) -> Any:
        """Count a job attempt that raised (RQ calls this just before it retries or fails the job)."""
        if self.runtime is not None:
            exc = exc_info[1] if len(exc_info) > 1 else None
            stopped = self._stopped_job_id == job.id  # `rq` was asked to stop it: never retried
            reason = ("stopped" if stopped else "storage" if isinstance(exc, TransientError) else
                      "refused" if isinstance(exc, (RefusedJob, InvalidJobArguments)) else "internal")
            retried = bool(job.should_retry) and not stopped
            self.runtime.metrics.job_failures.labels(reason=reason, retried=str(retried).lower()).inc()
        return super().handle_exception(job, *exc_info)

    def health(self) -> tuple[bool, str]:
        """Model loaded, and either a fresh heartbeat, a job still inside its time limit, or a wait for
        space in a full Redis."""
        if self.runtime is None:
            return False, "model not loaded"
        full_for = waiting_for_space(self.connection)
        if full_for is not None:  # a restart cannot free Redis; the alert on deepfake_redis_full_seconds tells
            return True, f"waiting {full_for:.0f} s for space in Redis (it is full)"
        now = time.time()
        if self._job_started is not None:
            if now - self._job_started <= self._job_timeout + 60:
                return True, "busy"
            return False, f"job running for {now - self._job_started:.0f} s, past its limit"
        if heartbeat_fresh(self._beat, self.worker_ttl + 60, now):
            return True, "idle"
        return False, "heartbeat stale"

    def teardown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
        super().teardown()
