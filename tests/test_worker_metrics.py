"""The worker's own metrics behind the alerts (worker/metrics.py): the queue's state read from a real
redis-server at scrape time, job attempts that raised counted by reason and retry, and a scrape that
still answers, quickly, when Redis is gone or frozen. (A real `rq worker` process serves them:
tests/test_worker_process.py::test_metrics_and_health_endpoint.)"""
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from prometheus_client import generate_latest
from redis import Redis
from rq import Retry
from servers import RedisServer, free_ports, stop
from workers import burst

from worker.jobs import MODERATE_FUNC
from worker.metrics import SCRAPE_TIMEOUT_S, Metrics
from worker.queue import get_queue, queue_status
from worker.runtime import WorkerRuntime
from worker.s3 import make_client

QUEUE = "deepfake"


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_queue_state_is_read_from_redis_at_each_scrape(redis, settings):
    metrics = Metrics()
    metrics.watch_queues(redis, [QUEUE])
    assert sample(metrics, "deepfake_queue_jobs", queue=QUEUE, state="queued") == 0
    assert sample(metrics, "deepfake_queue_oldest_job_age_seconds", queue=QUEUE) == 0
    queue = get_queue(redis, QUEUE)
    first = queue.enqueue(MODERATE_FUNC, args=("b", "one.mp4"))
    time.sleep(1.2)
    queue.enqueue(MODERATE_FUNC, args=("b", "two.mp4"))
    urgent = queue.enqueue(MODERATE_FUNC, args=("b", "urgent.mp4"), at_front=True)  # the head: `enqueue --front`
    assert sample(metrics, "deepfake_queue_jobs", queue=QUEUE, state="queued") == 3
    age = sample(metrics, "deepfake_queue_oldest_job_age_seconds", queue=QUEUE)
    assert 1.2 <= age < 30  # the first job's age, not the second's or the head's
    status = queue_status(settings=settings.model_copy(update={"queue": QUEUE}), connection=redis)
    assert status["queued"] == 3 and age - 0.1 <= status["oldest_waiting_s"] < 30  # `deepfake status` too (to 0.1 s)
    first.cancel()  # leaves the list: the oldest waiting job is now the second
    urgent.cancel()
    assert sample(metrics, "deepfake_queue_jobs", queue=QUEUE, state="queued") == 1
    assert sample(metrics, "deepfake_queue_oldest_job_age_seconds", queue=QUEUE) < age
    assert sample(metrics, "deepfake_queue_jobs", queue=QUEUE, state="scheduled") == 0
    retry = queue.enqueue_in(timedelta(minutes=5), MODERATE_FUNC, args=("b", "three.mp4"))  # as a retry waits
    assert sample(metrics, "deepfake_queue_jobs", queue=QUEUE, state="scheduled") == 1
    assert sample(metrics, "deepfake_queue_jobs", queue=QUEUE, state="queued") == 1  # not waiting on the queue
    assert queue_status(settings=settings.model_copy(update={"queue": QUEUE}), connection=redis)["scheduled"] == 1
    assert retry.get_status() == "scheduled"  # not due: status leaves it


def test_refused_and_storage_failures_are_counted_and_end_in_the_failed_registry(redis, settings, moderator):
    dead_s3 = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens: every S3 call fails
    s = settings.model_copy(update={"allowed_buckets": "uploads", "s3_endpoint_url": dead_s3})
    runtime = WorkerRuntime(s, moderator=moderator, s3_client=make_client(dead_s3, attempts=2))
    runtime.metrics.watch_queues(redis, [QUEUE])
    queue = get_queue(redis, QUEUE)
    queue.enqueue("os.getcwd")  # naming other code: refused, never retried
    queue.enqueue(MODERATE_FUNC, args=("uploads", "clip.mp4"), retry=Retry(max=1))  # retried once, then failed
    burst(redis, s, runtime=runtime)
    m = runtime.metrics
    assert sample(m, "deepfake_job_failures_total", reason="refused", retried="false") == 1
    assert sample(m, "deepfake_job_failures_total", reason="storage", retried="true") == 1
    assert sample(m, "deepfake_job_failures_total", reason="storage", retried="false") == 1
    assert sample(m, "deepfake_job_failures_total", reason="internal", retried="false") == 0  # exported from the start
    assert sample(m, "deepfake_queue_jobs", queue=QUEUE, state="failed") == 2
    assert sample(m, "deepfake_queue_jobs", queue=QUEUE, state="queued") == 0


@pytest.mark.parametrize("status", [503, 403])
def test_a_verdict_store_that_refuses_the_write_is_a_storage_failure(redis, settings, moderator, s3_server, corpus,
                                                                     status, tmp_path):
    """S3 throttling the verdict's PUT, or a policy without s3:PutObject on the verdict prefix: the
    attempt counts as `storage` (DeepfakeStorageFailing) and says which upload's verdict store failed;
    0.4.5 counted it `internal` (DeepfakeInternalErrors: "a bug") with botocore's bare error."""
    from faultproxy import FaultProxy, Rule

    from worker.queue import job_state

    bucket = "metrics-verdicts"
    s3_server.bucket_with(bucket, {"clip.mp4": corpus["carphone"].read_bytes()})
    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule(method="PUT", action="status", status=status, path=r"\.json$"))
        s = settings.model_copy(update={"allowed_buckets": bucket, "s3_endpoint_url": proxy.endpoint, "frames": 4,
                                        "verdict_prefix": f"v-{tmp_path.name}/"})
        runtime = WorkerRuntime(s, moderator=moderator, s3_client=make_client(proxy.endpoint, attempts=1))
        job = get_queue(redis, QUEUE).enqueue(MODERATE_FUNC, args=(bucket, "clip.mp4"))
        burst(redis, s, runtime=runtime)
    m = runtime.metrics
    assert sample(m, "deepfake_job_failures_total", reason="storage", retried="false") == 1
    assert sample(m, "deepfake_job_failures_total", reason="internal", retried="false") == 0
    error = job_state(job.id, settings=s, connection=redis).error
    assert error.startswith(f"worker.errors.TransientError: the verdict store failed for s3://{bucket}/clip.mp4: "), error
    assert "PutObject" in error


def scrape_seconds(metrics: Metrics) -> tuple[float, str]:
    t0 = time.monotonic()
    body = generate_latest(metrics.registry).decode()
    return time.monotonic() - t0, body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["redis", "worker"])
def test_a_scrape_answers_without_the_queue_series_when_redis_is_down_or_frozen(tmp_path, client, monkeypatch):
    """Also from the worker's own client (RQ_CONNECTION_CLASS), which rides out an outage: the scrape's
    connection used to get its ride-out back, and waited the outage out."""
    from worker.redis_client import WaitingRedis

    monkeypatch.setenv("DEEPFAKE_REDIS_OUTAGE_S", "20")
    server = RedisServer.start(tmp_path)
    try:
        metrics = Metrics()
        metrics.watch_queues({"redis": Redis, "worker": WaitingRedis}[client].from_url(server.url), [QUEUE])
        metrics.jobs.labels(status="ok").inc()
        _, body = scrape_seconds(metrics)
        assert 'deepfake_queue_jobs{queue="deepfake",state="queued"} 0.0' in body
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            seconds, body = scrape_seconds(metrics)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert seconds < SCRAPE_TIMEOUT_S * 3, seconds
        assert "deepfake_queue_jobs{" not in body and 'deepfake_jobs_total{status="ok"} 1.0' in body
        _, body = scrape_seconds(metrics)  # thawed: back
        assert 'deepfake_queue_jobs{queue="deepfake",state="queued"} 0.0' in body
    finally:
        stop(server.proc)
    seconds, body = scrape_seconds(metrics)  # gone: refused at once
    assert seconds < SCRAPE_TIMEOUT_S and "deepfake_queue_jobs{" not in body


def test_verdicts_are_counted_by_action(moderator, corpus):
    """The review queue's inflow: verdicts count by action, error verdicts by their code's (a damaged
    upload goes to review, an unreadable one has none)."""
    metrics = Metrics()
    verdicts = [moderator.moderate_path(corpus[name]) for name in ("carphone", "no_face_mp4", "damaged_tail_mp4")]
    for verdict in verdicts:
        metrics.observe_verdict(verdict)
    # the decision score's distribution (drift): the one scored verdict, in its 0.05-wide bucket
    score = verdicts[0]["decision"]["score"]
    assert sample(metrics, "deepfake_decision_score_count") == 1 and sample(metrics, "deepfake_decision_score_sum") == score
    upper = next(b for b in (0.05 * i for i in range(1, 21)) if score <= round(b, 2) + 1e-12)
    assert sample(metrics, "deepfake_decision_score_bucket", le=str(round(upper, 2))) == 1
    assert sample(metrics, "deepfake_decision_score_bucket", le=str(round(upper - 0.05, 2))) in (0, None)
    # what videos cost (frames sampled) and how many damaged packets were skipped, decoded videos only
    assert sample(metrics, "deepfake_frames_per_video_count") == 2
    assert sample(metrics, "deepfake_frames_per_video_sum") == 32 + 24
    assert sample(metrics, "deepfake_damaged_packets_total") == 0
    metrics.observe_verdict(moderator.moderate_path(corpus["faces_after_damage_mp4"]))
    assert sample(metrics, "deepfake_damaged_packets_total") == 1
    metrics.observe_verdict(moderator.moderate_path(corpus["carphone"].parent / "missing.mp4"))
    assert sample(metrics, "deepfake_verdict_actions_total", action="block") == 2  # the random model calls it fake
    assert sample(metrics, "deepfake_verdict_actions_total", action="allow") == 1  # no face
    assert sample(metrics, "deepfake_verdict_actions_total", action="review") == 1  # corrupt
    assert sample(metrics, "deepfake_jobs_total", status="error") == 2


def test_every_known_label_value_is_exported_from_the_start_and_unknown_ones_as_other():
    """A series first scraped above 0 shows no increase() to the alerts: the first internal error or
    refused job of a pod KEDA had just started, counted before its first scrape, never alerted. And a
    verdict read back from S3 (a lost write race) is anyone's who can write there: its values must not
    make new series."""
    from worker.errors import ErrorCode

    m = Metrics()
    assert sample(m, "deepfake_errors_total", code="internal") == 0
    assert all(sample(m, "deepfake_errors_total", code=c.value) == 0 for c in ErrorCode)
    assert sample(m, "deepfake_job_failures_total", reason="refused", retried="false") == 0
    assert sample(m, "deepfake_webhooks_total", outcome="failed") == 0
    assert sample(m, "deepfake_verdict_actions_total", action="block") == 0
    m.observe_verdict({"status": "pwned", "action": "x" * 40, "error": {"code": "bogus"},
                       "timings_ms": {"made-up": 5}})
    assert sample(m, "deepfake_jobs_total", status="other") == 1
    assert sample(m, "deepfake_verdict_actions_total", action="other") == 1
    assert sample(m, "deepfake_errors_total", code="other") == 1
    body = generate_latest(m.registry).decode()
    assert "pwned" not in body and "bogus" not in body and "made-up" not in body
