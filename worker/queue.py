"""The client side of the queue: enqueue S3 keys, read results and queue state (a library over RQ;
the jobs that failed without a verdict are in worker.failed_jobs).

Jobs are JSON (RQ's JSONSerializer), their function a stable dotted path, their arguments plain
JSON. Enqueueing an object already queued, running or done for the same bytes (ETag), sampling and
model returns the existing job instead of computing it again.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError
from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError
from rq import Queue, Retry, Worker
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import as_text
from rq.webhook import Webhook

from worker import upload_index
from worker.decision import NO_FACE_ACTION, DecisionPolicy
from worker.errors import last_line
from worker.job_webhooks import was_undelivered
from worker.jobs import MODERATE_FUNC
from worker.maintenance import clean_abandoned, release_due_retries, started_registry
from worker.rq_worker import DeepfakeJob, model_key
from worker.s3 import S3Location, control_client, validate_location
from worker.settings import Settings
from worker.timestamps import parse_utc
from worker.verdict_store import DETERMINISTIC_ERRORS, VerdictStore, reusable
from worker.webhooks import check_webhooks

DEDUPE_PREFIX = "deepfake:dedupe:"
HEAD_SCAN = 100  # waiting jobs `queue_depths` reads the age of, from the head
# A waiting job to the front of its queue in one step (a job a worker already took is left alone, and
# none is lost between the two writes): RQ's queue is a list whose left end is popped first.
TO_FRONT = "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then return redis.call('LPUSH', KEYS[1], ARGV[1]) end return 0"
# A duplicate record changed only while it still names the job (ARGV[1]) read from it: deleted, or
# set to name another (ARGV[2], for ARGV[3] seconds).
RELEASE_CLAIM = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
REPLACE_CLAIM = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                 "return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) and 1 end return 0")
# A duplicate record claimed by an enqueue that has yet to make its job: `pending:<job id>`, for at
# most CLAIM_TTL_S (past the client's socket timeout: a live enqueue has made its job or failed by then).
PENDING, CLAIM_TTL_S = "pending:", 45
LIVE_STATUSES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.FINISHED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


# An enqueuer's client fails instead of hanging when Redis stops answering (no command here blocks).
CLIENT_SOCKET_TIMEOUT_S, CLIENT_CONNECT_TIMEOUT_S = 30.0, 10.0


def connect(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url, socket_timeout=CLIENT_SOCKET_TIMEOUT_S,
                          socket_connect_timeout=CLIENT_CONNECT_TIMEOUT_S)


def get_queue(connection: Redis, name: str) -> Queue:
    """The queue with the workers' job class: RQ's registry cleanup, which counting a registry runs,
    retries or fails abandoned jobs and sends their webhooks, and RQ's own Job would send them
    unsigned, unvetted and with its own body (worker.rq_worker.DeepfakeJob.send_webhooks)."""
    return Queue(name, connection=connection, serializer=JSONSerializer, job_class=DeepfakeJob)


def retry_policy(settings: Settings) -> Retry | None:
    """RQ's retries for a job, each after its backoff wait: a retry that waits sits in the queue's
    scheduled registry until a worker's scheduler (or `deepfake status`) moves it back onto the queue."""
    return Retry(max=settings.job_retries, interval=settings.retry_intervals_s()) if settings.job_retries else None


def answers(job: Job, *, etag: str, frames: int, workers: dict) -> bool:
    """Whether a job found by its duplicate record answers a new request for the same upload: one
    waiting or running, or one whose result a worker of the published record `workers` would reuse as
    a stored verdict (`verdict_store.reusable`: not a timeout or an internal error, and not another
    version's where decoding changed since). In a rolling update a worker of the previous version
    may finish a job queued under the new one's record: its answer was the old decoder's."""
    status = job.get_status()
    if status not in LIVE_STATUSES:
        return False
    if status != JobStatus.FINISHED:
        return True
    try:
        policy = published_policy(workers.get("decision_policy"))
    except (TypeError, ValueError):
        return False  # a record nobody could have published
    result = job.return_value()
    if isinstance(result, dict) and result.get("status") == "error" and "input" not in result:
        # Refused before a byte was read (over the size limit by its HEAD): no bytes to match, so only
        # these workers' own refusal answers, as they would give it again.
        return ((result.get("error") or {}).get("code") in DETERMINISTIC_ERRORS
                and result.get("worker_version") == workers.get("worker_version")
                and (result.get("model") or {}).get("sha256") == workers.get("sha256")
                and (policy is None or policy.answers(result)))
    return reusable(result, etag=etag, model_sha256=workers.get("sha256", ""), frames=frames,
                    max_sample_gap_s=workers.get("max_sample_gap_s") or 0.0, policy=policy,
                    worker_version=workers.get("worker_version"))


def published_policy(published: Any) -> DecisionPolicy | None:
    """The decision policy the workers published (`DecisionPolicy.published`); None when their record
    names none (a worker before 0.2)."""
    if not isinstance(published, dict) or not DecisionPolicy.names_a_policy(published):
        return None
    return DecisionPolicy.from_key(published, error_actions=dict(published.get("error_actions") or {}),
                                   no_face_action=published.get("no_face_action", NO_FACE_ACTION))


def dedupe_key(queue: str, bucket: str, key: str, etag: str, frames: int, model_sha256: str,
               policy: dict | None = None, max_sample_gap_s: float | None = None,
               worker_version: str | None = None) -> str:
    """The duplicate record's name: one per queue (two deployments may share a Redis database), upload
    bytes, sampling (frames and the workers' sampling gap), model, decision policy and worker version
    (a finished job's answer is another version's: the new job reuses the stored verdict where it
    can, `verdict_store.reusable`)."""
    parts = [queue, bucket, key, etag, frames, model_sha256, policy, max_sample_gap_s, worker_version]
    raw = json.dumps(parts, sort_keys=True).encode()
    return DEDUPE_PREFIX + hashlib.sha256(raw).hexdigest()


def object_etag(s3: Any, bucket: str, key: str, on_error: Callable[[Exception], None] | None = None) -> str | None:
    """The upload's ETag, or None when it cannot be read now (the job then reports why; `on_error` is
    told what failed)."""
    try:
        return s3.head_object(Bucket=bucket, Key=key)["ETag"]
    except (ClientError, BotoCoreError) as exc:
        if on_error is not None:
            on_error(exc)
        return None


def enqueue(
    bucket: str, key: str, *, frames: int | None = None, at_front: bool = False, webhook_url: str | None = None,
    etag: str | None = None, settings: Settings | None = None, connection: Redis | None = None, s3_client: Any = None,
) -> str:
    """Queue s3://bucket/key for moderation and return the job id (an existing one for a duplicate:
    moved to the front of the queue when `at_front` asks and it is still waiting; a duplicate with a
    webhook the existing job does not call gets a job of its own).

    `etag`: the object's ETag when the caller has it already (a listing), which saves a HEAD; "" when
    it could not be read (queued without a duplicate check)."""
    return enqueue_upload(bucket, key, frames=frames, at_front=at_front, webhook_url=webhook_url, etag=etag,
                          settings=settings, connection=connection, s3_client=s3_client).job_id


@dataclass(frozen=True)
class Enqueued:
    job_id: str
    new: bool  # False: an existing job answers for this upload (a duplicate)


def enqueue_upload(
    bucket: str, key: str, *, frames: int | None = None, at_front: bool = False, webhook_url: str | None = None,
    etag: str | None = None, settings: Settings | None = None, connection: Redis | None = None, s3_client: Any = None,
) -> Enqueued:
    """`enqueue`, saying whether the job is new (backfill counts those)."""
    settings = settings or Settings()
    validate_location(bucket, key)
    unstorable = VerdictStore(None, prefix=settings.verdict_prefix, bucket=settings.verdict_bucket).unstorable(
        S3Location(bucket, key))
    if unstorable:
        raise ValueError(unstorable)
    frames = frames or settings.frames
    connection = connection or connect(settings)
    queue = get_queue(connection, settings.queue)
    if etag is None:
        s3 = s3_client or control_client(settings.s3_endpoint_url, settings.s3_region)
        etag = object_etag(s3, bucket, key)
    model = json.loads(connection.get(model_key(settings.queue)) or "{}")
    dkey = (dedupe_key(settings.queue, bucket, key, etag, frames, model.get("sha256", ""), model.get("decision_policy"),
                       model.get("max_sample_gap_s"), model.get("worker_version")) if etag else None)
    webhooks = [Webhook(webhook_url, status, method="POST") for status in ("finished", "failed")] if webhook_url else None
    check_webhooks(webhooks or [])  # what a worker would refuse to send is refused here, saying why
    job_id = str(uuid.uuid4())
    # A duplicate is answered by the live job, unless it would not tell this caller's receiver (it has
    # no such webhook, or finished and could not deliver it): then a new job (which reuses the stored
    # verdict) calls it, and the duplicate record names that one.
    existing = claim_duplicate(connection, dkey, job_id, accept=lambda job: answers(
        job, etag=etag, frames=frames, workers=model) and (webhook_url is None or (
            webhook_url in {w.url for w in job.webhooks} and not (
                job.get_status() == JobStatus.FINISHED and was_undelivered(connection, job.id, webhook_url))))
    ) if dkey else None
    if existing is not None:
        if at_front:
            connection.eval(TO_FRONT, 1, queue.key, existing.id)
        return Enqueued(existing.id, False)
    try:
        # unique: the hash is written and the id queued in one script that refuses an id it finds, so
        # a client that runs it again after a lost reply (redis-py's default for Redis(host, port))
        # does not queue the job twice: it gets DuplicateJobError, the job having been made.
        queue.enqueue(
            MODERATE_FUNC, args=(bucket, key), kwargs={"frames": frames}, job_id=job_id,
            job_timeout=settings.job_timeout_s(frames), result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s, retry=retry_policy(settings),
            at_front=at_front, description=f"moderate s3://{bucket}/{key}", webhooks=webhooks, unique=True,
        )
    except DuplicateJobError:
        pass  # made by the first run of the script, whose reply was lost
    except RedisError:
        # Perhaps only the reply was lost (a restart, a failover, a connection cut after EXEC): the job
        # is then queued, and raising would have the caller enqueue the upload a second time.
        if (made := job_made(connection, queue, job_id)) is not True:
            if made is False and dkey:  # nobody waits on a job that was never made
                connection.eval(RELEASE_CLAIM, 1, dkey, PENDING + job_id)
            raise  # unknown: the claim is kept until it expires (CLAIM_TTL_S)
    except BaseException:
        if dkey:
            connection.eval(RELEASE_CLAIM, 1, dkey, PENDING + job_id)
        raise
    if dkey:  # the claim becomes the duplicate record, unless another enqueue took it over meanwhile
        try:
            connection.eval(REPLACE_CLAIM, 1, dkey, PENDING + job_id, job_id, settings.result_ttl_s)
        except RedisError:  # the job is queued all the same: its claim expires, a duplicate then gets a job
            pass
    upload_index.record(connection, bucket, key, job_id=job_id, dedupe_key=dkey, ttl_s=settings.result_ttl_s)
    return Enqueued(job_id, True)


def job_made(connection: Redis, queue: Queue, job_id: str) -> bool | None:
    """Whether an enqueue that raised made its job (RQ writes the hash and queues it in one
    transaction); None when Redis cannot say now either."""
    try:
        return bool(connection.exists(queue.job_class.key_for(job_id)))
    except RedisError:
        return None


def claim_duplicate(connection: Redis, dkey: str, job_id: str, accept: Callable[[Job], bool],
                    wait_s: float = CLAIM_TTL_S + 5) -> Job | None:
    """The job the duplicate record `dkey` names, when `accept` takes it as the answer; otherwise
    None, the record now holding this enqueue's claim (`pending:<job_id>`, for `CLAIM_TTL_S`), which
    the caller turns into `job_id` once the job exists. Each step is atomic, so that enqueues of the
    same upload at once (an S3 event delivered twice) make one job between them: another enqueue's
    claim is waited for (its job is on the way), until it names the job or expires (that enqueue
    died first); a record naming a job that no longer exists is taken over."""
    mine = PENDING + job_id
    deadline = time.monotonic() + wait_s
    while not connection.set(dkey, mine, nx=True, ex=CLAIM_TTL_S):
        named = connection.get(dkey)
        if named is None:
            continue  # expired or erased just now: claim it
        named = as_text(named)
        if named == mine:
            return None  # this enqueue's own claim (its SET was retried after a lost reply)
        if named.startswith(PENDING):
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
        else:
            try:
                job = DeepfakeJob.fetch(named, connection=connection, serializer=JSONSerializer)
                if accept(job):
                    return job
            except Exception:  # noqa: BLE001 - gone, expired meanwhile, or a hash anyone could have written: no answer
                pass
        if connection.eval(REPLACE_CLAIM, 1, dkey, named, mine, CLAIM_TTL_S):
            return None
    return None


@dataclass
class JobState:
    id: str
    status: str
    result: dict | None
    error: str | None  # a failed job's exception, its last line (`Type: message`), as `deepfake failed` shows it
    traceback: str | None = None  # the whole of it, where the worker recorded one

    def to_dict(self) -> dict:
        shown = {"job_id": self.id, "status": self.status, "result": self.result, "error": self.error}
        return {**shown, "traceback": self.traceback} if self.traceback else shown


def job_state(job_id: str, *, settings: Settings | None = None, connection: Redis | None = None) -> JobState | None:
    settings = settings or Settings()
    connection = connection or connect(settings)
    try:
        job = DeepfakeJob.fetch(job_id, connection=connection, serializer=JSONSerializer)  # other clients' times too
    except NoSuchJobError:  # gone, or a hash no worker could run (logged as malformed_job_skipped)
        return None
    status = job.get_status()
    error = trace = None
    if status == JobStatus.FAILED:
        latest = job.latest_result()
        trace = latest.exc_string if latest is not None else None
        error = last_line(trace) or "failed"
    return JobState(job.id, str(status.value if hasattr(status, "value") else status), job.return_value(), error,
                    trace)


def queue_depths(connection: Redis, name: str) -> dict:
    """Jobs `queued` (waiting), `started`, `failed` and `scheduled` (retries waiting out their backoff)
    as Redis holds them (no registry cleanup), and `oldest_waiting_s`, how long the oldest of the
    first `HEAD_SCAN` waiting jobs has waited (0 when none waits): `--front` puts the newest jobs at
    the head, so the oldest ordinary one is the first behind them, not the head. Two round trips.
    What /metrics exports at each scrape."""
    queue = get_queue(connection, name)
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key).zcard(StartedJobRegistry(queue=queue).key)
        pipe.zcard(FailedJobRegistry(queue=queue).key).zcard(ScheduledJobRegistry(queue=queue).key)
        pipe.lrange(queue.key, 0, HEAD_SCAN - 1)
        queued, started, failed, scheduled, head = pipe.execute()
    waited = 0.0
    if head:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in head:
                pipe.hget(Job.key_for(as_text(job_id)), "enqueued_at")
            stamps = []
            for stamp in filter(None, pipe.execute()):
                try:
                    stamps.append(parse_utc(as_text(stamp)).timestamp())
                except ValueError:
                    continue  # a raw client's time that is no time: its job is skipped as malformed
        if stamps:
            waited = max(0.0, time.time() - min(stamps))
    return {"queued": queued, "started": started, "failed": failed, "scheduled": scheduled,
            "oldest_waiting_s": waited}


def redis_memory(connection: Redis) -> dict:
    """What Redis holds against its `maxmemory` (0: none), from INFO, which managed Redis allows where
    CONFIG is disabled. Writes are refused once `counted_bytes` reaches a noeviction maxmemory."""
    info = connection.info("memory")
    used = int(info["used_memory"])
    # what maxmemory is held against: replication and AOF buffers are not counted
    counted = used - int(info.get("mem_not_counted_for_evict") or 0)
    return {"used_bytes": used, "counted_bytes": counted, "maxmemory_bytes": int(info.get("maxmemory") or 0),
            "policy": info.get("maxmemory_policy")}


def queue_status(*, settings: Settings | None = None, connection: Redis | None = None) -> dict:
    """The queue's counts, after the maintenance pass (`maintenance`: "done", or why it was skipped:
    a full Redis refuses the lock's write, and the counts and `redis_memory` are what an operator
    needs then)."""
    settings = settings or Settings()
    connection = connection or connect(settings)
    queue = get_queue(connection, settings.queue)
    try:
        clean_abandoned(queue)
        release_due_retries(queue)
        maintenance = "done"
    except OutOfMemoryError as exc:  # maxmemory under noeviction: reads still work
        maintenance = f"skipped: Redis is full and refused the write ({exc})"
    depths = queue_depths(connection, settings.queue)
    return {
        "queue": settings.queue,
        "maintenance": maintenance,
        "queued": depths["queued"],  # the list's length, as queue.count reads it
        # the registries' own counts: they drop expired entries first, which /metrics does not; the
        # started registry's abandoned jobs are moved on under the workers' lock first
        "started": started_registry(queue).get_job_count(cleanup=False),
        "finished": FinishedJobRegistry(queue=queue).count,
        "failed": FailedJobRegistry(queue=queue).count,
        "scheduled": depths["scheduled"],  # retries waiting out their backoff
        "oldest_waiting_s": round(depths["oldest_waiting_s"], 1),
        "workers": len(Worker.all(queue=queue)),
        "model": json.loads(connection.get(model_key(settings.queue)) or "null"),
        "redis_memory": redis_memory(connection),
    }


def upload_of(job: Job) -> tuple[str, str] | None:
    """(bucket, key) a moderation job names; None for any other job, or arguments nobody could read."""
    try:
        args = job.args if job.func_name == MODERATE_FUNC else []
    except Exception:  # noqa: BLE001 - a job hash anyone could have written
        return None
    return (args[0], args[1]) if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str) else None


def __getattr__(name: str) -> Any:
    """What moved to worker.failed_jobs in 0.4.3, still importable from here."""
    if name in ("FailedJob", "failed_jobs", "requeue_failed"):
        from worker import failed_jobs

        return getattr(failed_jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
