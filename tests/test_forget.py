"""`deepfake forget` against a real redis-server and a real S3 server: an upload's jobs, results,
duplicate records, verdict and report are erased, a job running on it is waited for, and another
upload's records are left alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from faultproxy import FaultProxy, Rule
from rq.job import Job
from rq.registry import StartedJobRegistry
from structlog.testing import capture_logs
from workers import abandon, burst

from worker.forget import forget
from worker.jobs import MODERATE_FUNC
from worker.maintenance import clean_abandoned
from worker.queue import enqueue, get_queue, job_state
from worker.runtime import WorkerRuntime
from worker.s3 import S3Location, make_client
from worker.settings import Settings
from worker import upload_index
from worker.upload_index import index_key

BUCKET = "erasable"
ALICE, BOB = "users/alice/clip.mp4", "users/bob/clip.mp4"


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    clip = corpus["carphone"].read_bytes()
    return s3_server.bucket_with(BUCKET, {ALICE: clip, BOB: clip})


@pytest.fixture()
def fsettings(random_model_dir, redis_server, s3_server, tmp_path):
    return Settings(model_dir=random_model_dir, redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint,
                    allowed_buckets=BUCKET, frames=4, metrics_port=0, log_format="json", upload_reports=True,
                    verdict_prefix=f"v-{tmp_path.name}/")


def stored_keys(s3, settings, key) -> list[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{settings.verdict_prefix}{key}")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_an_upload_is_erased_and_the_others_are_not(s3, redis, fsettings, moderator):
    burst(redis, fsettings, moderator)  # a worker has started: duplicates are matched on its model
    done = enqueue(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    bob = enqueue(BUCKET, BOB, settings=fsettings, connection=redis, s3_client=s3)
    burst(redis, fsettings, moderator)
    original = job_state(done, settings=fsettings, connection=redis).result
    assert original["status"] == "ok"
    alice_objects = stored_keys(s3, fsettings, ALICE)
    assert f"{fsettings.verdict_prefix}{ALICE}.json" in alice_objects and len(alice_objects) > 2  # + the report
    waiting = enqueue(BUCKET, ALICE, frames=2, settings=fsettings, connection=redis, s3_client=s3)
    # as a non-Python client would: no index entry until a worker starts it
    raw = get_queue(redis, fsettings.queue).enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3}).id
    # and a malformed job hash in the queue (anyone who can write to Redis): skipped, not fatal
    redis.hset("rq:job:malformed", mapping={"data": b"not zlib", "created_at": "yesterday"})
    redis.rpush(f"rq:queue:{fsettings.queue}", "malformed")

    gone = forget(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    assert gone.complete and sorted(gone.jobs_deleted) == sorted([done, waiting, raw])
    assert sorted(u.removeprefix(f"s3://{BUCKET}/") for u in gone.s3_deleted) == alice_objects
    assert stored_keys(s3, fsettings, ALICE) == []
    for job_id in (done, waiting, raw):
        assert not Job.exists(job_id, connection=redis) and not redis.exists(f"rq:results:{job_id}")
    assert get_queue(redis, fsettings.queue).get_job_ids() == ["malformed"]
    assert not redis.exists(index_key(BUCKET, ALICE))
    assert not [k for k in redis.scan_iter("deepfake:dedupe:*") if redis.get(k).decode() in (done, waiting)]
    # Bob's job, result and stored verdict are untouched.
    assert job_state(bob, settings=fsettings, connection=redis).result["status"] == "ok"
    assert f"{fsettings.verdict_prefix}{BOB}.json" in stored_keys(s3, fsettings, BOB)
    assert enqueue(BUCKET, BOB, settings=fsettings, connection=redis, s3_client=s3) == bob  # still a duplicate
    # Alice uploads again: a new job and a new verdict (none is reused).
    again = enqueue(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    assert again != done
    burst(redis, fsettings, moderator)
    fresh = job_state(again, settings=fsettings, connection=redis).result
    assert fresh["status"] == "ok" and fresh["created_at"] != original["created_at"]  # scored anew, not reused


def test_keys_shaped_like_anothers_feedback_or_report_erase_nothing_of_it(s3, redis, fsettings, moderator):
    """`clip.mp4.feedback` and `clip.mp4.report/index.html` are keys S3 allows; their verdict paths would be
    clip.mp4's feedback object and a file of its report. No verdict of theirs is ever written (the
    worker refuses them as unstorable): erasing them leaves clip.mp4's records, and reading one shows none."""
    from worker.feedback import record
    from worker.verdict_store import VerdictStore

    rt = WorkerRuntime(fsettings, moderator=moderator, s3_client=s3)
    assert rt.moderate_s3(BUCKET, ALICE)["status"] == "ok"
    record(BUCKET, ALICE, "real", settings=fsettings, s3_client=s3)
    before = stored_keys(s3, fsettings, ALICE)
    assert f"{fsettings.verdict_prefix}{ALICE}.feedback.json" in before and any(".report/" in k for k in before)
    for lookalike in (f"{ALICE}.feedback", f"{ALICE}.report/index.html"):
        gone = forget(BUCKET, lookalike, settings=fsettings, connection=redis, s3_client=s3)
        assert gone.complete and gone.s3_deleted == [], lookalike
        assert VerdictStore.for_settings(fsettings, s3).read(S3Location(BUCKET, lookalike))["verdict"] is None
    assert stored_keys(s3, fsettings, ALICE) == before


def test_a_retry_waiting_out_its_backoff_is_erased(s3, redis, fsettings):
    """A retry sits in RQ's scheduled registry, neither queued nor running: left there, it would run
    and write a verdict after the erasure. A raw client's job has no index entry to find it by."""
    from datetime import datetime, timedelta, timezone

    from rq.registry import ScheduledJobRegistry

    queue = get_queue(redis, fsettings.queue)
    raw = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})
    queue.remove(raw.id)
    queue.schedule_job(raw, datetime.now(timezone.utc) + timedelta(minutes=10))  # as RQ's retry does
    gone = forget(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    assert gone.jobs_deleted == [raw.id] and not Job.exists(raw.id, connection=redis)
    assert ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_a_retry_a_scheduler_hands_to_a_worker_meanwhile_is_waited_for(s3, redis, fsettings, monkeypatch):
    """Just after forget reads the lists, the retry's backoff ends: a worker's scheduler moves it onto
    the queue and a worker dequeues and starts it. Deleted then, as the retry forget had seen, it ran
    on from the worker's memory and stored its verdict after the erasure."""
    from datetime import datetime, timedelta, timezone

    from rq.registry import ScheduledJobRegistry
    from rq.serializers import JSONSerializer

    import worker.forget
    from worker.rq_worker import DeepfakeJob
    from worker.scheduler import RetryScheduler

    queue = get_queue(redis, fsettings.queue)
    raw = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})
    queue.remove(raw.id)
    queue.schedule_job(raw, datetime.now(timezone.utc) - timedelta(seconds=1))  # due
    read_lists, reads = worker.forget.lists, []

    def lists_then_the_scheduler_moves(q):
        now = read_lists(q)
        reads.append(now)
        if len(reads) == 1:
            scheduler = RetryScheduler([q.name], connection=redis, serializer=JSONSerializer, job_class=DeepfakeJob)
            assert scheduler.move(ScheduledJobRegistry(queue=q), q, raw.id)
            assert redis.lmove(q.key, q.intermediate_queue.key).decode() == raw.id  # a worker's dequeue
            redis.zadd(StartedJobRegistry(queue=q).key, {f"{raw.id}:execution": time.time() + 60})  # and start
        return now

    monkeypatch.setattr(worker.forget, "lists", lists_then_the_scheduler_moves)
    gone = forget(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3, wait_s=0.5, sleep=time.sleep)
    assert raw.id in reads[0].scheduled and len(reads) > 1
    assert gone.jobs_deleted == [] and gone.still_running == [raw.id] and not gone.complete
    assert Job.exists(raw.id, connection=redis)  # the worker's to finish; forget is run again after


def test_a_job_stranded_by_a_lost_dequeue_reply_is_erased(s3, redis, fsettings):
    """A dequeue whose reply was lost leaves its job in RQ's intermediate list, from which the
    maintenance (worker.maintenance.recover_stranded) would retry it after the erasure."""
    queue = get_queue(redis, fsettings.queue)
    raw = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})  # no index entry
    assert redis.lmove(queue.key, queue.intermediate_queue.key).decode() == raw.id  # a worker's dequeue
    gone = forget(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    assert gone.jobs_deleted == [raw.id] and not Job.exists(raw.id, connection=redis)
    assert clean_abandoned(queue) and queue.intermediate_queue.get_job_ids() == []  # gone: dropped from the list


def test_a_job_just_dequeued_is_waited_for_as_a_running_one(s3, redis, fsettings):
    """Between a worker's dequeue and its start the job sits in RQ's intermediate list, already in the
    worker's hands: deleted then, it would still run and store a verdict after the erasure."""
    queue = get_queue(redis, fsettings.queue)
    started = StartedJobRegistry(queue=queue)
    job = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})
    assert redis.lmove(queue.key, queue.intermediate_queue.key).decode() == job.id  # a worker's dequeue
    seen = {}

    def start_then_end() -> None:  # what the worker does next, as RQ writes it (prepare_job_execution)
        time.sleep(1.0)
        with redis.pipeline() as pipe:
            pipe.zadd(started.key, {f"{job.id}:execution": time.time() + 60})
            pipe.lrem(queue.intermediate_queue.key, 1, job.id)
            pipe.execute()
        upload_index.record(redis, BUCKET, ALICE, job_id=job.id, ttl_s=600)  # worker.jobs, as the job starts
        time.sleep(1.0)
        seen["kept_while_it_ran"] = Job.exists(job.id, connection=redis)
        redis.zrem(started.key, f"{job.id}:execution")

    worker = threading.Thread(target=start_then_end)
    worker.start()
    gone = forget(BUCKET, ALICE, wait_s=60, settings=fsettings, connection=redis, s3_client=s3)
    worker.join()
    assert seen["kept_while_it_ran"]
    assert gone.complete and gone.jobs_deleted == [job.id] and not Job.exists(job.id, connection=redis)


def test_a_job_dequeued_just_after_forget_reads_the_lists_is_not_deleted_in_its_workers_hands(
        s3, redis, fsettings, monkeypatch):
    """The dequeue lands right after forget read where the jobs are (forced here at that moment): the
    job was waiting as forget saw it. Taken off the queue by forget itself, or found gone from it,
    it is deleted or waited for, never deleted while a worker holds it."""
    import worker.forget as forgetting

    queue = get_queue(redis, fsettings.queue)
    started = StartedJobRegistry(queue=queue)
    job = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})
    read = forgetting.lists
    seen = {}

    def read_then_dequeue(q):
        now = read(q)
        if "dequeued" not in seen:  # a worker's BLMOVE, just after
            seen["dequeued"] = redis.lmove(queue.key, queue.intermediate_queue.key).decode()
            threading.Thread(target=start_then_end).start()
        return now

    def start_then_end() -> None:
        time.sleep(1.0)
        with redis.pipeline() as pipe:
            pipe.zadd(started.key, {f"{job.id}:execution": time.time() + 60})
            pipe.lrem(queue.intermediate_queue.key, 1, job.id)
            pipe.execute()
        upload_index.record(redis, BUCKET, ALICE, job_id=job.id, ttl_s=600)
        time.sleep(1.0)
        seen["kept_while_it_ran"] = Job.exists(job.id, connection=redis)
        redis.zrem(started.key, f"{job.id}:execution")

    monkeypatch.setattr(forgetting, "lists", read_then_dequeue)
    gone = forget(BUCKET, ALICE, wait_s=60, settings=fsettings, connection=redis, s3_client=s3)
    assert seen["dequeued"] == job.id and seen["kept_while_it_ran"]
    assert gone.complete and gone.jobs_deleted == [job.id] and not Job.exists(job.id, connection=redis)


def test_jobs_are_deleted_under_the_queues_maintenance_lock(s3, redis, fsettings, monkeypatch):
    """While a worker's maintenance holds the lock (it may be retrying this very job), forget waits for
    it, then deletes holding it itself, and gives it back. A lock held over 5 minutes (its holder died)
    is done without at once, and one held to forget's deadline then; either is left to expire."""
    from worker.forget import STALE_LOCK_S
    from worker.maintenance import LOCK_TTL_S

    queue = get_queue(redis, fsettings.queue)
    raw = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})
    assert queue.acquire_maintenance_lock()  # a maintenance at work
    held_while_deleting, done = [], {}
    real_delete = Job.delete

    def delete(job, *args, **kwargs):  # noqa: ANN001 - what forget sees when it deletes
        held_while_deleting.append(redis.get(queue.registry_cleaning_key) is not None)
        return real_delete(job, *args, **kwargs)

    monkeypatch.setattr(Job, "delete", delete)
    eraser = threading.Thread(target=lambda: done.update(gone=forget(BUCKET, ALICE, settings=fsettings,
                                                                      connection=redis, s3_client=s3)))
    eraser.start()
    time.sleep(1.5)
    assert eraser.is_alive() and Job.exists(raw.id, connection=redis)  # waiting for the lock
    queue.release_maintenance_lock()
    eraser.join(30)
    assert done["gone"].jobs_deleted == [raw.id] and held_while_deleting == [True]
    assert redis.get(queue.registry_cleaning_key) is None  # given back

    try:
        for age, wait_s, reason in ((STALE_LOCK_S + 1, None, "stale"), (1, 1.0, "deadline")):
            stuck = queue.enqueue(MODERATE_FUNC, args=(BUCKET, ALICE), kwargs={"frames": 3})
            assert queue.acquire_maintenance_lock()  # its holder died `age` seconds ago
            redis.expire(queue.registry_cleaning_key, LOCK_TTL_S - age)
            naps: list[float] = []
            with capture_logs() as logs:
                gone = forget(BUCKET, ALICE, wait_s=wait_s, settings=fsettings, connection=redis, s3_client=s3,
                              sleep=lambda s: (naps.append(s), time.sleep(s)))
            assert gone.jobs_deleted == [stuck.id] and not Job.exists(stuck.id, connection=redis)
            assert bool(naps) == (reason == "deadline")  # a stale lock is not waited for
            assert [(e["upload"], e["reason"]) for e in logs if e["event"] == "forget_unlocked"] == \
                [(f"s3://{BUCKET}/{ALICE}", reason)]
            assert redis.ttl(queue.registry_cleaning_key) > 0  # not forget's to give back
            queue.release_maintenance_lock()
    finally:
        queue.release_maintenance_lock()


@pytest.mark.timeout(180)
def test_a_running_job_is_waited_for_before_s3_is_erased(s3_server, s3, redis, fsettings, moderator):
    gate, results = threading.Event(), {}
    with FaultProxy(s3_server.port) as proxy:
        # the worker's first read of Alice's upload waits for the gate: the job is running meanwhile
        proxy.add(Rule("hook", method="GET", path=ALICE + "$", hook=lambda req: gate.wait(60), times=1))
        slow = fsettings.model_copy(update={"s3_endpoint_url": proxy.endpoint})
        job_id = enqueue(BUCKET, ALICE, settings=slow, connection=redis, s3_client=s3)

        def erase() -> None:  # what an operator runs while the worker (below, in the main thread) works
            started = StartedJobRegistry(queue=get_queue(redis, slow.queue))
            deadline = time.monotonic() + 60
            while job_id not in started and time.monotonic() < deadline:
                time.sleep(0.05)
            results["early"] = forget(BUCKET, ALICE, wait_s=0, settings=slow, connection=redis, s3_client=s3)
            results["exists"] = Job.exists(job_id, connection=redis)
            threading.Timer(1.0, gate.set).start()  # the job goes on while forget waits
            results["gone"] = forget(BUCKET, ALICE, wait_s=120, settings=slow, connection=redis, s3_client=s3)

        eraser = threading.Thread(target=erase, daemon=True)
        eraser.start()
        burst(redis, slow, moderator)
        eraser.join(120)
    early, gone = results["early"], results["gone"]
    assert not early.complete and early.still_running == [job_id] and early.s3_deleted == [] and results["exists"]
    assert gone.complete and gone.jobs_deleted == [job_id] and not Job.exists(job_id, connection=redis)
    assert f"s3://{BUCKET}/{slow.verdict_prefix}{ALICE}.json" in gone.s3_deleted  # written while it waited
    assert stored_keys(s3, slow, ALICE) == []


def moderated_bucket(s3_server, fsettings, moderator, corpus, bucket: str, *, versioned: bool):
    """A bucket of its own holding ALICE's upload and its verdict: (client, settings, runtime)."""
    client = s3_server.bucket_with(bucket, {ALICE: corpus["carphone"].read_bytes()})
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    settings = fsettings.model_copy(update={"allowed_buckets": bucket})
    rt = WorkerRuntime(settings, moderator=moderator, s3_client=client)
    rt.moderate_s3(bucket, ALICE)
    return client, settings, rt


def forget_with_versioning_answered(s3_server, redis, settings, bucket: str, status: int):
    """forget(ALICE) through a proxy that answers every GetBucketVersioning with `status`."""
    from faultproxy import FaultProxy, Rule

    from worker.s3 import make_client

    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule(method="GET", action="status", status=status, when=lambda r: "versioning" in r.query))
        return forget(bucket, ALICE, settings=settings, connection=redis,
                      s3_client=make_client(proxy.endpoint, attempts=1))


def test_in_a_versioned_bucket_every_version_is_erased(s3_server, redis, fsettings, moderator, corpus):
    """A plain DELETE in a versioned bucket leaves the verdict (face boxes) and report (face crops)
    behind a delete marker: forget removes every version."""
    bucket = "erasable-versioned"
    client, settings, rt = moderated_bucket(s3_server, fsettings, moderator, corpus, bucket, versioned=True)
    rt.store.put(S3Location(bucket, ALICE), {"overwritten": True},  # a second version of the verdict
                 replaces=rt.store.get(S3Location(bucket, ALICE))[1])

    def versions() -> list[str]:
        listed = client.list_object_versions(Bucket=bucket, Prefix=settings.verdict_prefix)
        return [v["Key"] for v in listed.get("Versions", []) + listed.get("DeleteMarkers", [])]

    assert versions().count(f"{settings.verdict_prefix}{ALICE}.json") == 2 and len(versions()) > 3  # + report
    gone = forget(bucket, ALICE, settings=settings, connection=redis, s3_client=client)
    assert gone.complete and versions() == []
    assert all("?versionId=" in uri for uri in gone.s3_deleted) and len(gone.s3_deleted) > 3


def test_another_deployments_jobs_in_the_same_redis_are_left_alone(s3, redis, fsettings):
    """Deployments may share a Redis database on their own queues: forget erases its own queue's jobs."""
    other = fsettings.model_copy(update={"queue": "other-deployment"})
    theirs = enqueue(BUCKET, ALICE, settings=other, connection=redis, s3_client=s3)
    mine = enqueue(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    gone = forget(BUCKET, ALICE, wait_s=0, settings=fsettings, connection=redis, s3_client=s3)
    assert gone.jobs_deleted == [mine] and Job.exists(theirs, connection=redis)
    assert get_queue(redis, other.queue).get_job_ids() == [theirs]
    # their index entry and duplicate record stay, so their own forget finds the job, and a duplicate
    # enqueue there is still answered by it
    assert upload_index.recorded(redis, BUCKET, ALICE)[0] == {theirs}
    assert enqueue(BUCKET, ALICE, settings=other, connection=redis, s3_client=s3) == theirs


def test_a_job_whose_worker_died_is_not_waited_for(s3, redis, fsettings):
    """A job abandoned by a killed worker stays in the started registry until something moves it on:
    forget does, under the workers' maintenance lock, instead of waiting its whole limit for it."""
    job_id = enqueue(BUCKET, BOB, settings=fsettings, connection=redis, s3_client=s3)
    abandon(redis, job_id, fsettings.queue)
    gone = forget(BUCKET, BOB, wait_s=5, settings=fsettings, connection=redis, s3_client=s3)
    assert gone.complete and gone.still_running == [] and job_id in gone.jobs_deleted  # not waited for
    assert not Job.exists(job_id, connection=redis) and get_queue(redis, fsettings.queue).count == 0


def test_the_command_prints_one_line_per_upload(s3, redis, redis_server, s3_server, fsettings, moderator):
    enqueue(BUCKET, BOB, settings=fsettings, connection=redis, s3_client=s3)
    burst(redis, fsettings, moderator)
    env = {**os.environ, "DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_VERDICT_PREFIX": fsettings.verdict_prefix}
    proc = subprocess.run([sys.executable, "-m", "worker", "forget", f"s3://{BUCKET}/{BOB}", f"s3://{BUCKET}/nobody.mp4"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bob, nobody = (json.loads(line) for line in proc.stdout.splitlines())
    assert bob["complete"] and len(bob["jobs_deleted"]) == 1 and bob["s3_deleted"]
    assert nobody == {"upload": f"s3://{BUCKET}/nobody.mp4", "jobs_deleted": [], "still_running": [],
                      "s3_deleted": [], "s3_remaining": None, "complete": True}
    assert stored_keys(make_client(s3_server.endpoint), fsettings, BOB) == []
    bad = subprocess.run([sys.executable, "-m", "worker", "forget", "s3://erasable/../x"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2


def test_scan_finds_jobs_from_before_the_index(s3, redis, fsettings, moderator):
    job_id = enqueue(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    burst(redis, fsettings, moderator)
    redis.delete(index_key(BUCKET, ALICE))  # as a job that finished before this version kept an index
    missed = forget(BUCKET, ALICE, settings=fsettings, connection=redis, s3_client=s3)
    assert missed.jobs_deleted == [] and Job.exists(job_id, connection=redis)  # S3 is erased all the same
    found = forget(BUCKET, ALICE, scan=True, settings=fsettings, connection=redis, s3_client=s3)
    assert found.jobs_deleted == [job_id] and not Job.exists(job_id, connection=redis)


def test_forget_waits_longer_than_any_job_can_run():
    """The default wait follows the job time limit the settings derive (a longer sampling gap or
    duration limit lengthens both); a fixed 420 s fell short once long videos got more frames."""
    from worker.forget import default_wait_s
    from worker.settings import Settings

    assert default_wait_s(Settings()) == Settings().job_timeout_s() + 28 == 628
    longer = Settings(max_duration_s=3600)
    assert default_wait_s(longer) > longer.job_timeout_s() > Settings().job_timeout_s()


def test_an_erasure_that_cannot_read_versioning_is_not_called_complete(s3_server, redis, fsettings, moderator,
                                                                        corpus):
    """S3 refusing GetBucketVersioning (a policy without it, or throttling past the retries): forget
    deletes the current objects, but in a versioned bucket the older versions stay, so the erasure
    says so and is not complete (0.4.4 said complete, exit 0, and `deepfake verdict` found nothing)."""
    bucket = "erasable-unknown"
    client, settings, _ = moderated_bucket(s3_server, fsettings, moderator, corpus, bucket, versioned=True)
    verdict_key = f"{settings.verdict_prefix}{ALICE}.json"
    gone = forget_with_versioning_answered(s3_server, redis, settings, bucket, 403)
    assert f"s3://{bucket}/{verdict_key}" in gone.s3_deleted
    assert not gone.complete and "AccessDenied" in gone.s3_remaining and gone.to_dict()["complete"] is False
    listed = client.list_object_versions(Bucket=bucket, Prefix=verdict_key)
    assert len(listed.get("Versions", [])) == 1  # what it said: the old version is still there
    again = forget(bucket, ALICE, settings=settings, connection=redis, s3_client=client)  # mended: run again
    assert again.complete and client.list_object_versions(Bucket=bucket, Prefix=verdict_key).get("Versions", []) == []


def test_an_erasure_on_a_store_without_versioning_is_complete(s3_server, redis, fsettings, moderator, corpus):
    """A store that does not implement versioning answers GetBucketVersioning with NotImplemented: it
    holds no older versions, so that is no reason to call the erasure incomplete."""
    bucket = "erasable-plain"
    client, settings, _ = moderated_bucket(s3_server, fsettings, moderator, corpus, bucket, versioned=False)
    gone = forget_with_versioning_answered(s3_server, redis, settings, bucket, 501)
    assert gone.complete and gone.s3_remaining is None
    assert f"s3://{bucket}/{settings.verdict_prefix}{ALICE}.json" in gone.s3_deleted
    assert client.list_objects_v2(Bucket=bucket, Prefix=settings.verdict_prefix).get("Contents", []) == []


def test_an_erasure_that_s3_fails_part_way_says_what_went(s3_server, redis, fsettings, moderator, corpus):
    """S3 failing after the first DELETE: the record still says which jobs left Redis and which
    objects left S3, and is not complete (0.4.5 raised, and the command printed only the error)."""
    bucket = "erasable-broken"
    client, settings, _ = moderated_bucket(s3_server, fsettings, moderator, corpus, bucket, versioned=False)
    job_id = enqueue(bucket, ALICE, settings=settings, connection=redis, s3_client=client)

    def stored() -> list[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{settings.verdict_prefix}{ALICE}")
        return sorted(o["Key"] for o in listed.get("Contents", []))

    before = stored()
    assert len(before) > 1, before  # the verdict and its report's files
    deletes: list[str] = []

    def after_the_first(req) -> bool:
        deletes.append(req.path)
        return len(deletes) > 1

    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule(method="DELETE", action="status", status=500, when=after_the_first))
        gone = forget(bucket, ALICE, settings=settings, connection=redis,
                      s3_client=make_client(proxy.endpoint, attempts=1))
    assert gone.jobs_deleted == [job_id] and not Job.exists(job_id, connection=redis)
    assert not gone.complete and gone.s3_remaining.startswith("S3 failed part-way")
    left = stored()
    assert len(gone.s3_deleted) == 1 and len(left) == len(before) - 1
    assert not any(uri.endswith("/" + key) for uri in gone.s3_deleted for key in left)
    again = forget(bucket, ALICE, settings=settings, connection=redis, s3_client=client)
    assert again.complete and stored() == []
