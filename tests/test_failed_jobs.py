"""Recovering jobs that failed without a verdict, as an operator answering DeepfakeJobsFailed would:
S3 is down for longer than a job's retries, `deepfake failed` lists the job with its error,
`deepfake requeue` puts it back, and once S3 answers again it ends with exactly one verdict. Real
redis-server, real S3 server, the real worker class and the real CLI entry point."""
from __future__ import annotations

import json

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from servers import free_ports
from workers import burst, stored

from worker import upload_index
from worker.cli import main
from worker.jobs import MODERATE_FUNC
from worker.queue import enqueue, get_queue, job_state
from worker.runtime import WorkerRuntime
from worker.s3 import make_client

BUCKET = "recover"
KEY = "clips/carphone.mp4"


@pytest.fixture()
def s3(s3_server, corpus):
    return s3_server.bucket_with(BUCKET, {KEY: corpus["carphone"].read_bytes()})


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()  # drop what the workers logged before
    code = main(list(argv))
    return code, [line for line in capsys.readouterr().out.splitlines() if line]


def test_a_job_lost_to_an_s3_outage_is_listed_requeued_and_then_gets_its_one_verdict(
        s3, s3_server, redis, redis_server, settings, moderator, monkeypatch, capsys, tmp_path):
    s = settings.model_copy(update={"redis_url": redis_server.url, "allowed_buckets": BUCKET, "frames": 8,
                                    "job_retries": 1, "job_retry_backoff_s": "0", "s3_endpoint_url": s3_server.endpoint,
                                    "verdict_prefix": f"v-{tmp_path.name}/"})
    for name in ("redis_url", "allowed_buckets", "frames", "job_retries", "verdict_prefix"):
        monkeypatch.setenv(f"DEEPFAKE_{name.upper()}", str(getattr(s, name)))
    refused = get_queue(redis, s.queue).enqueue("os.getcwd").id  # naming other code: fails at once
    job_id = enqueue(BUCKET, KEY, settings=s, connection=redis, s3_client=s3)

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"  # the outage: nothing answers there
    burst(redis, s, runtime=WorkerRuntime(s, moderator=moderator, s3_client=make_client(dead, attempts=2)))
    assert job_state(job_id, settings=s, connection=redis).status == "failed"  # both attempts failed (no backoff)
    assert stored(s3, s, KEY) == []

    code, lines = cli(capsys, "failed")
    listed = {j["job_id"]: j for j in map(json.loads, lines)}
    failed, foreign = listed.pop(job_id), listed.pop(refused)
    assert listed == {}
    assert code == 0 and (failed["bucket"], failed["key"]) == (BUCKET, KEY)
    assert failed["error"].startswith("worker.errors.TransientError:") and failed["failed_at"]
    assert foreign["bucket"] is None  # its arguments are nobody's upload
    assert foreign["error"].startswith("worker.rq_worker.RefusedJob:")
    assert len(cli(capsys, "failed", "--limit", "1")[1]) == 1
    code, [shown] = cli(capsys, "result", job_id)  # the same line as `failed`; the rest under `traceback`
    shown = json.loads(shown)
    assert code == 0 and shown["status"] == "failed" and shown["error"] == failed["error"]
    assert shown["traceback"].startswith("Traceback") and shown["traceback"].rstrip().endswith(failed["error"])

    monkeypatch.setenv("DEEPFAKE_JOB_RETRY_BACKOFF_S", "7")  # the requeuer's settings
    assert 0 < redis.ttl(Job.key_for(job_id)) <= s.result_ttl_s  # RQ's failure set it to expire
    redis.delete(upload_index.index_key(BUCKET, KEY))  # as it expires with the failure
    code, lines = cli(capsys, "requeue", job_id, "no-such-job")
    assert code == 1 and json.loads(lines[0]) == {"requeued": [job_id], "not_failed": ["no-such-job"]}
    assert job_state(job_id, settings=s, connection=redis).status == "queued"
    assert redis.ttl(Job.key_for(job_id)) == -1  # waits in the queue however long it takes, as a new job does
    assert upload_index.recorded(redis, BUCKET, KEY)[0] == {job_id}  # `deepfake forget` finds it meanwhile
    requeued = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert requeued.retries_left == s.job_retries and requeued.retry_intervals == [7]  # again, with the waits
    assert [json.loads(line)["job_id"] for line in cli(capsys, "failed")[1]] == [refused]

    burst(redis, s, moderator)  # S3 is back
    state = job_state(job_id, settings=s, connection=redis)
    assert state.status == "finished" and state.result["status"] == "ok"
    [only] = stored(s3, s, KEY)
    assert only["created_at"] == state.result["created_at"]
    assert cli(capsys, "requeue", "--all") == (0, [json.dumps({"requeued": [refused], "not_failed": []})])
    assert cli(capsys, "requeue", "--all") == (0, [json.dumps({"requeued": [], "not_failed": []})])


def test_failed_jobs_whose_hash_is_gone_or_malformed_neither_stop_the_listing_nor_leave_stubs(
        redis, redis_server, settings, monkeypatch, capsys):
    """A failed registry entry outlives its hash by a moment (or for good, where Redis evicts), and
    anyone who can write to Redis can write a hash RQ cannot read."""
    monkeypatch.setenv("DEEPFAKE_REDIS_URL", redis_server.url)
    redis.flushdb()
    queue = get_queue(redis, settings.queue)
    registry = FailedJobRegistry(queue=queue)
    good, gone, garbled = (queue.enqueue(MODERATE_FUNC, args=(BUCKET, f"clips/{n}.mp4")) for n in range(3))
    for job in (good, gone, garbled):
        queue.remove(job)
        registry.add(job, ttl=600)
    redis.delete(gone.key)
    redis.hset(garbled.key, "created_at", "not-a-date")

    code, lines = cli(capsys, "failed")
    assert code == 0 and [json.loads(line)["job_id"] for line in lines] == [good.id]

    code, lines = cli(capsys, "requeue", gone.id, garbled.id, good.id)
    assert code == 1 and json.loads(lines[0]) == {"requeued": [good.id], "not_failed": [gone.id, garbled.id]}
    assert not redis.exists(gone.key) and gone.id not in registry  # no stub hash, no entry counted for ever
    assert 0 < redis.ttl(garbled.key) <= 600  # left to expire with its failure, not made to last
    assert queue.job_ids == [good.id]


def test_a_job_whose_worker_died_is_listed_with_when_it_failed(redis, redis_server, settings, monkeypatch, capsys):
    """The commonest failure DeepfakeJobsFailed counts: the worker died mid-job and the job had no
    retry left. RQ sets no ended_at then; 0.4.4 listed it with `failed_at: null`."""
    from datetime import datetime, timedelta, timezone

    from workers import abandon

    from worker.queue import queue_status

    monkeypatch.setenv("DEEPFAKE_REDIS_URL", redis_server.url)
    redis.flushdb()
    once = settings.model_copy(update={"redis_url": redis_server.url, "job_retries": 0})
    job_id = enqueue(BUCKET, "clips/died.mp4", etag="", settings=once, connection=redis)
    abandon(redis, job_id, once.queue)
    before = datetime.now(timezone.utc)
    queue_status(settings=once, connection=redis)  # the maintenance pass moves it to the failed registry
    code, lines = cli(capsys, "failed")
    [failed] = [json.loads(line) for line in lines]
    assert code == 0 and failed["job_id"] == job_id and "AbandonedJobError" in failed["error"]
    at = datetime.fromisoformat(failed["failed_at"])
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    assert before - timedelta(seconds=5) <= at <= datetime.now(timezone.utc) + timedelta(seconds=5)
