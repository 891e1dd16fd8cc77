"""Retries wait out their backoff (`DEEPFAKE_JOB_RETRY_BACKOFF_S`) in RQ's scheduled registry, and
come back onto the queue when it is over: by the scheduler every `rq worker deepfake` runs, or by
`deepfake status` (the maintenance CronJob) when no worker runs. Real redis-server, S3 server,
worker class, `rq worker` process and CLI entry point."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from redis import Redis
from servers import free_ports, stop
from workers import DurableRedis, abandon, burst, queue_settings, start_rq_worker, stored, worker_env

from worker.cli import main
from worker import maintenance
from worker.maintenance import clean_abandoned, release_due_retries
from worker.queue import enqueue, get_queue, job_state
from worker.runtime import WorkerRuntime
from worker.s3 import make_client
from worker.settings import Settings

BUCKET = "backoff"
KEY = "clips/carphone.mp4"
LOCK = "rq:scheduler-lock:deepfake"  # RQ's scheduler lock for the queue


def listening(redis: Redis) -> bool:
    """A worker waits on the queue: RQ sets "idle" only after installing its signal handlers (a
    worker registered but not yet idle exits on SIGTERM at once, with 143: worker/signals.py)."""
    return any(redis.hget(key, "state") == b"idle" for key in redis.smembers("rq:workers:deepfake"))


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    return s3_server.bucket_with(BUCKET, {KEY: corpus["carphone"].read_bytes()})


@pytest.fixture()
def qsettings(random_model_dir, redis_server, s3_server, tmp_path):
    return queue_settings(random_model_dir, redis_server, s3_server, tmp_path, BUCKET, job_retries=2,
                          job_retry_backoff_s="1,2")


def test_backoff_setting_gives_one_wait_per_retry_the_last_repeating():
    assert Settings().retry_intervals_s() == [30, 120, 600]  # the documented default, 3 retries
    assert Settings(job_retries=5, job_retry_backoff_s="5, 10").retry_intervals_s() == [5, 10, 10, 10, 10]
    assert Settings(job_retries=1, job_retry_backoff_s="5,10").retry_intervals_s() == [5]
    assert Settings(job_retries=0).retry_intervals_s() == []
    for bad in ("", "-1", "1,,2", "1.5", "ten", str(24 * 3600 + 1)):
        with pytest.raises(ValueError, match="whole seconds"):
            Settings(job_retry_backoff_s=bad)


def test_a_failed_attempt_waits_its_backoff_then_status_puts_it_back_with_no_worker_running(
        s3, redis, qsettings, moderator, monkeypatch, capsys):
    qsettings = qsettings.model_copy(update={"job_retry_backoff_s": "3"})
    job_id = enqueue(BUCKET, KEY, settings=qsettings, connection=redis, s3_client=s3)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"  # S3 down for the first attempt
    before = time.time()
    burst(redis, qsettings, runtime=WorkerRuntime(qsettings, moderator=moderator, s3_client=make_client(dead, attempts=2)))
    after = time.time()
    queue = get_queue(redis, qsettings.queue)
    scheduled = ScheduledJobRegistry(queue=queue)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "scheduled" and job.retries_left == 1 and queue.count == 0
    assert redis.xrevrange(f"rq:results:{job_id}") == []  # a retried attempt writes no result (README)
    due = scheduled.get_scheduled_time(job_id).timestamp()
    assert before + 2 < due <= after + 3  # the first wait, 3 s after the attempt failed (RQ keeps whole seconds)

    for name in ("redis_url", "queue"):
        monkeypatch.setenv(f"DEEPFAKE_{name.upper()}", str(getattr(qsettings, name)))
    assert release_due_retries(queue) == 0  # not due yet
    time.sleep(max(0.0, due + 1.1 - time.time()))
    holder = RQScheduler([queue.name], connection=redis, serializer=JSONSerializer)
    assert holder.acquire_locks() == {queue.name}  # a worker's scheduler has the queue: status leaves it to it
    assert release_due_retries(queue) == 0 and job_id in scheduled
    holder.release_locks()

    capsys.readouterr()
    assert main(["status"]) == 0  # what the maintenance CronJob runs every 5 minutes
    status = json.loads(capsys.readouterr().out)
    assert (status["queued"], status["scheduled"], status["workers"]) == (1, 0, 0)
    assert job_id not in scheduled and queue.get_job_ids() == [job_id]

    burst(redis, qsettings, moderator)  # S3 is back
    state = job_state(job_id, settings=qsettings, connection=redis)
    assert state.status == "finished" and state.result["status"] == "ok"
    [only] = stored(s3, qsettings, KEY)
    assert only["created_at"] == state.result["created_at"]


def strand(redis: Redis, queue: Any, *job_ids: str) -> None:
    """Take the queue's first jobs as a worker's dequeue does (its reply then lost: a Redis failover)."""
    for job_id in job_ids:
        assert redis.lmove(queue.key, queue.intermediate_queue.key).decode() == job_id  # RQ's dequeue command


def test_a_dequeue_whose_reply_was_lost_is_retried_by_status_with_no_worker_running(
        s3, redis, qsettings, moderator, monkeypatch, capsys):
    """A Redis failover can lose the reply to a worker's dequeue: its job sits in RQ's intermediate
    list, which no worker takes from and KEDA does not count. The maintenance CronJob finds it."""
    monkeypatch.setattr(maintenance, "STRANDED_AFTER_S", 1)  # RQ's minute, shortened
    queue, intermediate = get_queue(redis, qsettings.queue), get_queue(redis, qsettings.queue).intermediate_queue
    job_id = enqueue(BUCKET, KEY, settings=qsettings, connection=redis, s3_client=s3)
    unwritable = enqueue(BUCKET, "clips/unwritable.mp4", etag="", settings=qsettings, connection=redis)
    redis.hset(f"rq:job:{unwritable}", "meta", b"5")  # reads, but cannot be written back
    strand(redis, queue, job_id, unwritable)
    redis.hset("rq:job:malformed", mapping={"data": b"not a job", "origin": queue.name, "status": "queued"})
    redis.rpush(intermediate.key, "malformed", "gone", job_id)  # what a forged entry or an erased job leaves
    redis.set(intermediate.get_first_seen_key(job_id), time.time() - 86000)  # a mark from an earlier stay
    for name in ("redis_url", "queue"):
        monkeypatch.setenv(f"DEEPFAKE_{name.upper()}", str(getattr(qsettings, name)))

    def status() -> tuple[dict, list[dict]]:
        capsys.readouterr()
        assert main(["status"]) == 0
        out, err = capsys.readouterr()
        return json.loads(out), [json.loads(line) for line in err.splitlines()]  # logs: JSON lines on stderr

    stranded = [job_id, unwritable, "malformed", job_id]
    assert status()[0]["queued"] == 0 and intermediate.get_job_ids() == stranded  # seen once: a worker may be mid-dequeue
    assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status() == "queued"
    time.sleep(1.1)  # the next CronJob run
    counts, logs = status()
    assert counts["scheduled"] == 1 and intermediate.get_job_ids() == []
    assert [e["job_id"] for e in logs if e["event"] == "stranded_job_dropped"] == [unwritable]
    assert sorted(e["job_id"] for e in logs if e["event"] == "stranded_job_recovered") == sorted([job_id, "malformed"])
    assert not redis.keys(f"{intermediate.key}:first_seen:*") and not redis.keys("rq:worker:*")  # no marks, no stray worker hash
    assert FailedJobRegistry(queue=queue).get_job_ids() == ["malformed"]  # as any abandoned job with no retry
    capsys.readouterr()
    assert main(["failed"]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["job_id"] == "malformed" and "intermediate queue" in listed["error"], listed
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "scheduled" and job.retries_left == 1  # retried as a job whose worker died

    time.sleep(2.1)  # its 1 s backoff, in RQ's whole seconds
    assert status()[0]["queued"] == 1 and queue.get_job_ids() == [job_id]  # where KEDA sees it
    burst(redis, qsettings, moderator)
    state = job_state(job_id, settings=qsettings, connection=redis)
    assert state.status == "finished" and state.result["status"] == "ok"
    assert len(stored(s3, qsettings, KEY)) == 1


def test_recovery_leaves_waiting_jobs_alone_and_mends_half_written_retries(redis, qsettings, monkeypatch):
    """Entries of jobs that are elsewhere are only taken off the list; a job whose retry was set but
    not written (RQ sets the status first) is retried again; a forged mark is not a sighting."""
    monkeypatch.setattr(maintenance, "STRANDED_AFTER_S", 0)
    queue = get_queue(redis, qsettings.queue)
    intermediate = queue.intermediate_queue
    waiting, half, forged = (enqueue(BUCKET, f"clips/{n}.mp4", etag="", settings=qsettings, connection=redis)
                             for n in ("waiting", "half", "forged"))
    strand(redis, queue, waiting, half, forged)
    redis.lpush(queue.key, waiting)  # the first back on the queue, its entry left over (a worker on several queues)
    redis.hset(f"rq:job:{half}", "status", "scheduled")  # in no registry: the write after it failed
    redis.set(intermediate.get_first_seen_key(forged), "x")
    assert maintenance.recover_stranded(queue) == 0  # first sightings; the waiting job's entry comes off
    assert intermediate.get_job_ids() == [half, forged] and queue.get_job_ids() == [waiting]
    assert maintenance.recover_stranded(queue) == 2 and intermediate.get_job_ids() == []
    for job_id, retries_left in ((waiting, 2), (half, 1), (forged, 1)):
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        assert job.retries_left == retries_left, job_id
    assert sorted(ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False)) == sorted([half, forged])


def test_a_retry_cut_off_before_its_write_leaves_the_job_for_maintenance_to_retry(redis, qsettings):
    """A waiting retry's status is written with the rest of the retry, in one transaction. RQ wrote
    `scheduled` on its own first: a worker killed (or a write failing) in between left the job saying
    scheduled in the started registry alone, whose cleanup drops jobs not `started`: it was lost. The
    maintenance mends a job left so (by an earlier worker, or an RQ tool with RQ's own job class)."""
    queue = get_queue(redis, qsettings.queue)
    job_id = enqueue(BUCKET, "clips/cut-off.mp4", etag="", settings=qsettings, connection=redis)
    abandon(redis, job_id, qsettings.queue)  # the attempt that failed
    job = queue.fetch_job(job_id)
    with redis.pipeline() as pipe:  # the failure handling's own transaction, never sent: killed here
        job.retry(queue, pipe)
        assert job.get_status(refresh=False) == "scheduled"
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "started" and job.retries_left == 2  # Redis holds the job as it was
    legacy = enqueue(BUCKET, "clips/legacy.mp4", etag="", settings=qsettings, connection=redis)
    abandon(redis, legacy, qsettings.queue)
    redis.hset(Job.key_for(legacy), "status", "scheduled")  # what RQ's own retry, cut off, leaves
    assert clean_abandoned(queue)  # the maintenance takes both for abandoned: retried after their 1 s wait
    for retried in (job_id, legacy):
        job = Job.fetch(retried, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "scheduled" and job.retries_left == 1, retried
    assert sorted(ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False)) == sorted([job_id, legacy])
    assert queue.started_job_registry.get_job_ids(cleanup=False) == []


def test_a_worker_retries_a_stranded_job_at_its_maintenance_and_runs_it(s3, redis, qsettings, moderator, monkeypatch):
    """The workers' maintenance runs the same recovery (RQ's own failed a multi-queue worker's
    finished jobs, and counted a sighting from a job's earlier stay)."""
    monkeypatch.setattr(maintenance, "STRANDED_AFTER_S", 0)
    qsettings = qsettings.model_copy(update={"job_retry_backoff_s": "0"})
    queue = get_queue(redis, qsettings.queue)
    job_id = enqueue(BUCKET, KEY, settings=qsettings, connection=redis, s3_client=s3)
    strand(redis, queue, job_id)
    burst(redis, qsettings, moderator)  # its maintenance sees it once; nothing else to do
    assert queue.intermediate_queue.get_job_ids() == [job_id] and job_state(job_id, connection=redis,
                                                                           settings=qsettings).status == "queued"
    burst(redis, qsettings, moderator)  # the next: retried at once (no backoff here), and run
    state = job_state(job_id, settings=qsettings, connection=redis)
    assert state.status == "finished" and state.result["status"] == "ok" and queue.intermediate_queue.get_job_ids() == []
    assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).retries_left == 1


def children(pid: int) -> list[int]:
    """The worker's scheduler processes: the children of live process `pid` (its main thread's, which
    forks the scheduler) that run its own command line. A library may run a short-lived helper
    (ldconfig, say) from the worker too, which is not the scheduler."""
    try:
        forks = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    out = []
    for child in forks:
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                out.append(child)
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def test_rq_worker_runs_a_scheduler_that_ends_with_it(s3, redis, redis_server, qsettings, tmp_path):
    """`rq worker deepfake`, without --with-scheduler, runs a due retry; killed, its scheduler goes too."""
    job_id = enqueue(BUCKET, KEY, settings=qsettings, connection=redis, s3_client=s3)
    schedule(redis, qsettings, job_id, 3)  # a retry waiting 3 s
    log = tmp_path / "worker.log"
    proc = start_rq_worker(worker_env(qsettings, redis_server.url), log)
    try:
        wait_for(lambda: job_state(job_id, settings=qsettings, connection=redis).status == "finished", 120,
                 f"the scheduled job never ran:\n{log.read_text()[-3000:]}")
        assert job_state(job_id, settings=qsettings, connection=redis).result["status"] == "ok"
        [scheduler] = wait_for(lambda: children(proc.pid), 10, "no scheduler process")
        assert redis.get(LOCK) is not None  # it holds the queue's lock

        os.kill(proc.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would: its scheduler stays
        proc.wait(10)
        wait_for(lambda: not alive(scheduler), 15, "the orphaned scheduler kept running")
        assert redis.get(LOCK) is None  # released on the way out: the next worker's scheduler takes over
        assert "is gone, stopping" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass


def schedule(redis, settings, job_id: str, in_s: float) -> None:
    """Put a waiting job in the scheduled registry, due in `in_s` seconds, as RQ's retry does."""
    queue = get_queue(redis, settings.queue)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    queue.remove(job_id)
    queue.schedule_job(job, datetime.now(timezone.utc) + timedelta(seconds=in_s))


@pytest.mark.timeout(240)
def test_the_scheduler_rides_out_a_redis_restart_with_its_worker(s3, qsettings, tmp_path):
    """RQ's scheduler process died at the first refused connection, and its worker started another
    only at its next maintenance (10 minutes): retries waited that long after a Redis restart."""
    server = DurableRedis(free_ports(1)[0], tmp_path).start()
    settings = qsettings.model_copy(update={"redis_url": server.url})
    log = tmp_path / "worker.log"
    # Its client gives up after 1 s: the idle worker retries its dequeue on its own, the scheduler
    # meets the errors (with the default 120 s, its client rides shorter outages out unseen).
    proc = start_rq_worker(worker_env(settings, server.url, DEEPFAKE_REDIS_OUTAGE_S="1"), log)
    try:
        redis = Redis.from_url(server.url)
        wait_for(lambda: children(proc.pid), 60, f"no scheduler process:\n{log.read_text()[-3000:]}")
        wait_for(lambda: redis.get(LOCK) is not None, 60, "the scheduler never took the queue's lock")
        wait_for(lambda: listening(redis), 60, "the worker never started listening")
        [scheduler] = children(proc.pid)  # the one at work now, holding the lock
        time.sleep(1)  # waiting on the queue: RQ's loop retries a refused dequeue itself
        server.crash()
        time.sleep(3)  # the scheduler's heartbeats meet a refused connection
        server.start()
        wait_for(lambda: "Scheduler: working again" in log.read_text(), 30, f"no reconnect:\n{log.read_text()[-3000:]}")
        # the same process, still at work
        assert alive(scheduler) and children(proc.pid) == [scheduler], (
            f"scheduler {scheduler} alive: {alive(scheduler)}; worker alive: {proc.poll() is None}; "
            f"its schedulers now: {children(proc.pid)}\n{log.read_text()[-4000:]}")
        job_id = enqueue(BUCKET, KEY, settings=settings, connection=redis, s3_client=s3)
        schedule(redis, settings, job_id, 1)
        wait_for(lambda: job_state(job_id, settings=settings, connection=redis).status == "finished", 60,
                 f"the retry never ran:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        if server.proc and server.proc.poll() is None:
            stop(server.proc)


def test_two_schedulers_at_once_move_each_due_job_onto_the_queue_once(redis, qsettings):
    """A lock holder that stalled past its lock's 61 s (a Redis outage) goes on with its pass while the
    next holder runs its own; job hashes that cannot be read, or read but not written
    back, are dropped, not fatal."""
    import threading

    from worker.rq_worker import DeepfakeJob
    from worker.scheduler import RetryScheduler

    queue = get_queue(redis, qsettings.queue)
    ids = [enqueue(BUCKET, f"clips/due-{i}.mp4", etag="", settings=qsettings, connection=redis) for i in range(200)]
    for job_id in ids:
        schedule(redis, qsettings, job_id, -5)  # all due
    redis.hset("rq:job:malformed", mapping={"data": b"not zlib", "created_at": "yesterday"})
    redis.zadd(ScheduledJobRegistry(queue=queue).key, {"malformed": 1})
    unwritable = enqueue(BUCKET, "clips/unwritable.mp4", etag="", settings=qsettings, connection=redis)
    schedule(redis, qsettings, unwritable, -10)  # the first due: it used to block every job after it
    redis.hset(f"rq:job:{unwritable}", "meta", b"5")  # reads, but cannot be written back
    schedulers = []
    for _ in range(2):
        scheduler = RetryScheduler([queue.name], connection=redis, serializer=JSONSerializer, job_class=DeepfakeJob)
        scheduler._acquired_locks = {queue.name}  # both believe they hold the lock
        schedulers.append(scheduler)
    gate, moved = threading.Barrier(2), []

    def run(scheduler):
        gate.wait()
        moved.append(scheduler.enqueue_scheduled_jobs())

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    waiting = queue.get_job_ids()
    assert sorted(waiting) == sorted(ids) and sum(moved) == len(ids), (len(waiting), moved)
    assert ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False) == []  # the malformed one dropped too


def test_a_job_the_scheduler_cannot_move_is_logged_once_and_forgotten_once_gone(redis, qsettings, monkeypatch,
                                                                                 caplog):
    """The scheduler lives as long as its worker, weeks: what it keeps of jobs it could not move (to
    log each once) is only those still due. The fault is injected (no real job hash makes RQ's
    enqueue raise anything but a RedisError); the scheduler and Redis are real."""
    from worker.rq_worker import DeepfakeJob
    from worker.scheduler import RetryScheduler

    queue = get_queue(redis, qsettings.queue)
    stuck, fine = (enqueue(BUCKET, f"clips/{n}.mp4", etag="", settings=qsettings, connection=redis)
                   for n in ("stuck", "fine"))
    for job_id in (stuck, fine):
        schedule(redis, qsettings, job_id, -5)
    scheduler = RetryScheduler([queue.name], connection=redis, serializer=JSONSerializer, job_class=DeepfakeJob)
    scheduler._acquired_locks = {queue.name}
    move = scheduler.move

    def failing_for_one(registry, q, job_id):
        if job_id == stuck:
            raise ValueError("cannot be written")
        return move(registry, q, job_id)

    monkeypatch.setattr(scheduler, "move", failing_for_one)
    with caplog.at_level(logging.ERROR):
        assert scheduler.enqueue_scheduled_jobs() == 1 and queue.get_job_ids() == [fine]
        assert scheduler.enqueue_scheduled_jobs() == 0  # still due, still failing: not logged again
    assert [r.getMessage() for r in caplog.records].count(
        f"Scheduler: job {stuck} cannot be moved (ValueError: cannot be written), left where it is") == 1
    assert scheduler._failing == {stuck}
    ScheduledJobRegistry(queue=queue).remove(stuck)  # erased (`deepfake forget`)
    assert scheduler.enqueue_scheduled_jobs() == 0 and scheduler._failing == set()


def test_sigterm_to_the_worker_alone_stops_its_scheduler_and_frees_the_lock(redis, redis_server, qsettings, tmp_path):
    """Kubernetes signals PID 1 only: the worker must stop its scheduler itself."""
    log = tmp_path / "worker.log"
    proc = start_rq_worker(worker_env(qsettings, redis_server.url), log)
    try:
        [scheduler] = wait_for(lambda: children(proc.pid), 60, f"no scheduler process:\n{log.read_text()[-3000:]}")
        wait_for(lambda: redis.get(LOCK) is not None, 60, "the scheduler never took the queue's lock")
        wait_for(lambda: listening(redis), 60, "the worker never started listening")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not alive(scheduler) and redis.get(LOCK) is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_retry_without_backoff_is_queued_once_when_redis_loses_the_reply(redis, redis_server, qsettings):
    """With no backoff (DEEPFAKE_JOB_RETRY_BACKOFF_S=0) a retry was pushed straight onto the queue, in a
    transaction without WATCH. Redis applied it and the connection dropped before the reply (a restart,
    a failover): the worker's client ran it again, and the job was queued, and run, twice. Now every
    retry waits in the scheduled registry, due at once: the rerun adds it again in place."""
    from redisproxy import ReplyCutter

    from worker.redis_client import ride_out

    qsettings = qsettings.model_copy(update={"job_retry_backoff_s": "0"})
    job_id = enqueue(BUCKET, "clips/lost-reply.mp4", etag="", settings=qsettings, connection=redis)
    abandon(redis, job_id, qsettings.queue)

    def retries(sent: bytes) -> bool:  # the cleanup's transaction that retries the job
        return b"EXEC" in sent and job_id.encode() in sent and (b"RPUSH" in sent or b"ZADD" in sent)

    with ReplyCutter(redis_server.port, when=retries) as cut:
        worker_connection = Redis.from_url(cut.url)
        ride_out(worker_connection, 30)  # the worker's client: reconnects and runs the command again
        assert clean_abandoned(get_queue(worker_connection, qsettings.queue))  # a worker's maintenance
        assert cut.fired.is_set()
    queue = get_queue(redis, qsettings.queue)
    assert queue.get_job_ids() == [] and ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False) == [job_id]
    assert release_due_retries(queue) == 1  # due at once: the next scheduler pass
    assert queue.get_job_ids() == [job_id]
    assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).retries_left == qsettings.job_retries - 1
