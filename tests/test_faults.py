"""Faults against the real servers: S3 slow, erroring, resetting, the object deleted or replaced mid-read
(through tests/faultproxy.py in front of SeaweedFS), Redis killed and restarted while jobs run (a
dedicated redis-server with an always-fsynced append-only file), and two workers racing on one object.

After each: every job has exactly one final verdict, nothing is lost, no verdict is written twice or
half. (SIGTERM and SIGKILL of a worker mid-job are in test_worker_process.py.)
"""
from __future__ import annotations

import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config
from faultproxy import FaultProxy, Rule
from media import encode, scenery_frames
from redis import Redis
from rq import Retry
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from servers import ensure_bucket, free_ports, stop
from structlog.testing import capture_logs
from workers import DurableRedis, Supervisor, burst, stored, wait_until_final

from worker.errors import TransientError
from worker import jobs
from worker.jobs import MODERATE_FUNC, TIMEOUT_VERDICT_S
from worker.queue import enqueue, get_queue, job_state
from worker.runtime import WorkerRuntime
from worker.settings import Settings

BUCKET = "faults"
KEYS = {
    "carphone": "clips/carphone.mp4",
    "big": "big/scenery.avi",  # > 4 MiB: two ranged GETs, so a fault can strike mid-read
    "long": "big/two-hours.mp4",  # 2 h declared at the front of a multi-MiB file
    "text": "bad/page.mp4",  # declared text/plain
}


def big_mjpeg(path: Path) -> Path:
    """~7 MB of 640×480 near-lossless MJPEG noise (18 frames, no face): two 4 MiB blocks."""
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(18)]
    encode(path, frames, codec="mjpeg", pix_fmt="yuvj420p", rate=10, options={"qmin": "1", "qmax": "1"})
    return path


def two_hours_faststart(path: Path) -> Path:
    frames = scenery_frames(60, size=(96, 128), seed=3)
    noise = np.random.default_rng(9)
    images = [np.clip(frames[i % 60].astype(int) + noise.integers(-40, 40, frames[0].shape), 0, 255).astype(np.uint8)
              for i in range(7200)]
    encode(path, images, rate=1, options={"preset": "ultrafast", "crf": "8"},
           container_options={"movflags": "+faststart"})
    return path


@pytest.fixture(scope="module")
def media(corpus, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fault-media")
    files = {"carphone": corpus["carphone"], "big": big_mjpeg(d / "big.avi"), "long": two_hours_faststart(d / "2h.mp4")}
    (d / "page.mp4").write_text("<html>not a video</html>\n" * 100)
    files["text"] = d / "page.mp4"
    return files


@pytest.fixture(scope="module")
def s3(s3_server, media):
    client = s3_server.client()
    ensure_bucket(client, BUCKET)  # test_soak.py uses this bucket too, under its own prefix
    for name, key in KEYS.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=media[name].read_bytes(),
                          ContentType="text/plain" if name == "text" else "video/mp4")
    assert media["big"].stat().st_size > 4 << 20 and media["long"].stat().st_size > 4 << 20
    return client


@pytest.fixture()
def proxy(s3_server):
    with FaultProxy(s3_server.port, seed=1) as p:
        yield p


@pytest.fixture()
def fsettings(random_model_dir, s3_server, tmp_path) -> Settings:
    return Settings(model_dir=random_model_dir, s3_endpoint_url=s3_server.endpoint, allowed_buckets=BUCKET, frames=4,
                    metrics_port=0, log_format="json", job_retries=2, verdict_prefix=f"v-{tmp_path.name}/")


def runtime(settings, moderator, endpoint, **client) -> WorkerRuntime:
    s3_client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(
        s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": client.get("attempts", 3)},
        connect_timeout=5, read_timeout=client.get("read_timeout", 60)))
    return WorkerRuntime(settings, moderator=moderator, s3_client=s3_client)


def beyond_first_block(req) -> bool:
    return (req.range_start or 0) > 0


# -- S3 faults, in process -------------------------------------------------------------------------
FAULTS = {
    "head_503_twice": lambda: Rule("status", method="HEAD", path="scenery", status=503, times=2),
    "get_500_twice": lambda: Rule("status", method="GET", path="scenery.avi$", status=500, times=2),
    "reset_before_answer": lambda: Rule("reset", method="GET", path="scenery.avi$", times=1),
    "reset_mid_body_first_block": lambda: Rule("reset_mid_body", method="GET", path="scenery.avi$", times=1),
    "reset_mid_body_second_block": lambda: Rule("reset_mid_body", method="GET", path="scenery.avi$",
                                                when=beyond_first_block, times=2),
    "slow_reads": lambda: Rule("delay", method="GET", path="scenery.avi$", delay_s=1.0, times=2),
    "slower_than_the_read_timeout": lambda: Rule("delay", method="GET", path="scenery.avi$", delay_s=3.0, times=1),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_s3_faults_that_retries_absorb_still_give_the_one_right_verdict(fault, s3, proxy, fsettings, moderator):
    clean = runtime(fsettings.model_copy(update={"verdict_prefix": fsettings.verdict_prefix + "clean/"}),
                    moderator, proxy.endpoint).moderate_s3(BUCKET, KEYS["big"])
    proxy.clear()
    rule = proxy.add(FAULTS[fault]())
    rt = runtime(fsettings, moderator, proxy.endpoint, read_timeout=1.5 if "timeout" in fault else 60)
    started = time.monotonic()
    verdict = rt.moderate_s3(BUCKET, KEYS["big"])
    assert rule.hits >= 1  # the fault really struck
    assert verdict["status"] == clean["status"] == "no_face", verdict["error"]
    assert verdict["video"]["frames_sampled"] == clean["video"]["frames_sampled"]
    [only] = stored(s3, fsettings, KEYS["big"])
    assert only["created_at"] == verdict["created_at"]
    assert time.monotonic() - started < 40


def test_a_storage_outage_is_never_written_down_as_a_verdict(s3, proxy, fsettings, moderator):
    proxy.add(Rule("status", method="GET", path="scenery.avi$", status=503, when=beyond_first_block))
    rt = runtime(fsettings, moderator, proxy.endpoint, attempts=2)
    with pytest.raises(TransientError):
        rt.moderate_s3(BUCKET, KEYS["big"])
    assert stored(s3, fsettings, KEYS["big"]) == []
    # One attempt and botocore's 2 retries ("max_attempts" counts retries), then the reader gave up:
    # FFmpeg re-reading after the failure got the same error back without another request.
    gets = proxy.requests("GET", "scenery.avi$")
    assert len(gets) == 1 + 3, [(g.range, g.status) for g in gets]


def test_an_outage_during_a_job_is_retried_by_rq_to_exactly_one_verdict(s3, proxy, fsettings, moderator,
                                                                        redis_server):
    """The retry waits out its backoff in RQ's scheduled registry; the worker's scheduler puts it back."""
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    settings = fsettings.model_copy(update={"redis_url": redis_server.url, "job_retry_backoff_s": "5"})
    # exactly one job attempt's worth: the first try and botocore's 2 retries of the second block
    passing = proxy.add(Rule("status", method="GET", path="scenery.avi$", status=503, when=beyond_first_block, times=3))
    job_id = enqueue(BUCKET, KEYS["big"], settings=settings, connection=redis, s3_client=s3)
    before = time.time()
    worker = burst(redis, settings, runtime=runtime(settings, moderator, proxy.endpoint, attempts=2))
    after = time.time()
    assert passing.hits == 3
    scheduled = ScheduledJobRegistry(queue=get_queue(redis, settings.queue))
    assert job_state(job_id, settings=settings, connection=redis).status == "scheduled"
    # the backoff, not at once: 5 s after the attempt failed (RQ keeps whole seconds)
    assert before + 4 < scheduled.get_scheduled_time(job_id).timestamp() <= after + 5
    worker.work(burst=True)  # nothing due: the job stays where it is
    assert job_state(job_id, settings=settings, connection=redis).status == "scheduled"
    time.sleep(max(0.0, scheduled.get_scheduled_time(job_id).timestamp() + 1 - time.time()))
    worker.work(burst=True)  # its scheduler moves the due retry onto the queue, and the worker runs it
    state = job_state(job_id, settings=settings, connection=redis)
    assert state.status == "finished" and state.result["status"] == "no_face"
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.retries_left == settings.job_retries - 1  # one attempt failed, RQ ran it again
    [only] = stored(s3, settings, KEYS["big"])
    assert only["created_at"] == state.result["created_at"]

    # An outage that outlasts every retry (at once here): the job fails, and still nothing is written.
    settings = settings.model_copy(update={"job_retry_backoff_s": "0"})
    proxy.clear()
    proxy.add(Rule("status", method="GET", path="carphone.mp4$", status=503))
    failing = enqueue(BUCKET, KEYS["carphone"], settings=settings, connection=redis, s3_client=s3)
    worker.work(burst=True)
    assert job_state(failing, settings=settings, connection=redis).status == "failed"
    assert failing in FailedJobRegistry(queue=get_queue(redis, settings.queue))
    assert stored(s3, settings, KEYS["carphone"]) == []


def test_a_job_past_its_rq_time_limit_gets_one_stored_timeout_verdict(s3, fsettings, moderator, redis_server):
    """RQ's SIGALRM lands mid-moderation; it used to come out as an `internal` verdict. (1024 frames,
    here and below, take longer than the 1 s limit on any machine: 120 did only on a slow one.)"""
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    settings = fsettings.model_copy(update={"redis_url": redis_server.url})
    job = get_queue(redis, settings.queue).enqueue(MODERATE_FUNC, args=(BUCKET, KEYS["carphone"]),
                                                   kwargs={"frames": 1024}, job_timeout=1)
    burst(redis, settings, runtime=runtime(settings, moderator, settings.s3_endpoint_url))
    state = job_state(job.id, settings=settings, connection=redis)
    assert state.status == "finished" and state.result["error"]["code"] == "timeout", state.result["error"]
    [only] = stored(s3, settings, KEYS["carphone"])
    assert only["error"]["code"] == "timeout" and only["created_at"] == state.result["created_at"]


def test_a_timed_out_job_stays_started_while_its_verdict_is_stored(s3, proxy, fsettings, moderator, redis_server):
    """Past its limit a job has RQ's 60 s before maintenance takes it for abandoned: storing its
    verdict gets `TIMEOUT_VERDICT_S` more first, seen from the store while the PUT arrives."""
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    settings = fsettings.model_copy(update={"redis_url": redis_server.url})
    registry = StartedJobRegistry(settings.queue, connection=redis)
    left: list[tuple[str, float]] = []
    proxy.add(Rule("hook", method="PUT", path=r"carphone\.mp4\.json$", times=1, hook=lambda req: left.extend(
        (member.decode(), score - time.time()) for member, score in redis.zrange(registry.key, 0, -1, withscores=True))))
    job = get_queue(redis, settings.queue).enqueue(MODERATE_FUNC, args=(BUCKET, KEYS["carphone"]),
                                                   kwargs={"frames": 1024}, job_timeout=1)
    burst(redis, settings, runtime=runtime(settings, moderator, proxy.endpoint))
    assert job_state(job.id, settings=settings, connection=redis).result["error"]["code"] == "timeout"
    [(member, seconds)] = left
    assert member.startswith(f"{job.id}:") and seconds > 60 + TIMEOUT_VERDICT_S - 5, left  # RQ's own: under 60


def test_a_timed_out_job_whose_verdict_cannot_be_stored_in_time_still_finishes(
        s3, proxy, fsettings, moderator, redis_server, monkeypatch):
    """A store that stalls on the timeout verdict's PUT: the job ends within the bound with the verdict
    as its result, instead of holding the worker past what its started entry and /healthz allow."""
    monkeypatch.setattr(jobs, "TIMEOUT_VERDICT_S", 2)
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    settings = fsettings.model_copy(update={"redis_url": redis_server.url})
    key = "clips/stalled-put.mp4"
    s3.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": KEYS["carphone"]})
    proxy.add(Rule("delay", method="PUT", path=r"stalled-put\.mp4\.json$", delay_s=20))
    job = get_queue(redis, settings.queue).enqueue(MODERATE_FUNC, args=(BUCKET, key), kwargs={"frames": 1024},
                                                   job_timeout=1)
    t0 = time.monotonic()
    burst(redis, settings, runtime=runtime(settings, moderator, proxy.endpoint))
    took = time.monotonic() - t0
    state = job_state(job.id, settings=settings, connection=redis)
    assert state.status == "finished" and state.result["error"]["code"] == "timeout", state
    assert took < 20, took  # ended while its PUT was still held


def test_a_timeout_verdict_stored_just_as_its_bound_falls_is_the_result(s3, fsettings, moderator, redis_server,
                                                                      monkeypatch):
    """The bound falls after the verdict was written, while it is logged (made slow here): the job's
    result is that stored verdict, not one saying nothing was stored."""
    monkeypatch.setattr(jobs, "TIMEOUT_VERDICT_S", 1)
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    settings = fsettings.model_copy(update={"redis_url": redis_server.url, "result_detail": "full"})
    key = "clips/slow-log.mp4"
    s3.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": KEYS["carphone"]})
    rt = runtime(settings, moderator, settings.s3_endpoint_url)
    finish = rt._finish

    def slow_finish(verdict, bound):
        if verdict.get("stored_at") and (verdict.get("error") or {}).get("code") == "timeout":
            time.sleep(3)
        return finish(verdict, bound)

    monkeypatch.setattr(rt, "_finish", slow_finish)
    job = get_queue(redis, settings.queue).enqueue(MODERATE_FUNC, args=(BUCKET, key), kwargs={"frames": 1024},
                                                   job_timeout=1)
    burst(redis, settings, runtime=rt)
    state = job_state(job.id, settings=settings, connection=redis)
    [only] = stored(s3, settings, key)
    assert state.result["error"]["code"] == "timeout" and state.result["stored_at"].endswith(f"{key}.json")
    assert only["created_at"] == state.result["created_at"]


def test_an_object_deleted_mid_read_gets_one_not_found_verdict(s3, proxy, fsettings, moderator, media):
    key = "big/deleted.avi"
    s3.put_object(Bucket=BUCKET, Key=key, Body=media["big"].read_bytes())
    rule = proxy.add(Rule("hook", method="GET", path="deleted.avi$", when=beyond_first_block, times=1,
                          hook=lambda req: s3.delete_object(Bucket=BUCKET, Key=key)))
    verdict = runtime(fsettings, moderator, proxy.endpoint).moderate_s3(BUCKET, key)
    assert rule.hits == 1
    assert verdict["status"] == "error" and verdict["error"]["code"] == "not_found", verdict["error"]
    [only] = stored(s3, fsettings, key)
    assert only["error"]["code"] == "not_found"


def test_an_object_replaced_mid_read_is_never_mixed_and_the_new_bytes_get_their_own_verdict(
        s3, proxy, fsettings, moderator, media, corpus):
    key = "big/replaced.avi"
    s3.put_object(Bucket=BUCKET, Key=key, Body=media["big"].read_bytes())
    replacement = corpus["carphone"].read_bytes()
    rule = proxy.add(Rule("hook", method="GET", path="replaced.avi$", when=beyond_first_block, times=1,
                          hook=lambda req: s3.put_object(Bucket=BUCKET, Key=key, Body=replacement)))
    rt = runtime(fsettings, moderator, proxy.endpoint)
    first = rt.moderate_s3(BUCKET, key)
    assert rule.hits == 1
    assert first["error"]["code"] == "corrupt" and "changed while it was being read" in first["error"]["message"]
    # The next job (the new upload's) sees another ETag: computed afresh, and replaces the stale verdict.
    second = rt.moderate_s3(BUCKET, key)
    assert second["status"] == "ok" and second["input"]["etag"] != first["input"]["etag"]
    [only] = stored(s3, fsettings, key)
    assert only["created_at"] == second["created_at"]


def test_limits_and_refusals_are_decided_before_the_bytes_are_read(s3, proxy, fsettings, moderator, media):
    small = fsettings.model_copy(update={"max_bytes": 1 << 20})
    v = runtime(small, moderator, proxy.endpoint).moderate_s3(BUCKET, KEYS["big"])
    assert v["error"]["code"] == "too_large"
    assert len(proxy.requests("HEAD", "scenery.avi$")) == 1 and proxy.requests("GET", "scenery.avi$") == []

    # The content type is the uploader's to choose: never a reason to leave the bytes unread.
    v = runtime(fsettings, moderator, proxy.endpoint).moderate_s3(BUCKET, KEYS["text"])
    assert v["error"]["code"] == "not_a_video" and proxy.requests("GET", "page.mp4$")  # its bytes said so
    body = media["carphone"].read_bytes()
    for key, declared in (("relabelled/face.gif", "image/gif"), ("relabelled/phone.3gp", "audio/3gpp"),
                          ("relabelled/capture.ts", "text/vnd.trolltech.linguist")):  # what tools send for these
        s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType=declared)
        v = runtime(fsettings, moderator, proxy.endpoint).moderate_s3(BUCKET, key)
        assert v["status"] == "ok" and v["video"]["frames_with_face"] > 0, (declared, v["error"])

    v = runtime(fsettings.model_copy(update={"allowed_buckets": "other"}), moderator, proxy.endpoint).moderate_s3(
        BUCKET, KEYS["carphone"])
    assert v["error"]["code"] == "access_denied" and proxy.requests(path="carphone") == []  # not even a HEAD

    v = runtime(fsettings.model_copy(update={"max_duration_s": 600}), moderator, proxy.endpoint).moderate_s3(
        BUCKET, KEYS["long"])
    assert v["error"]["code"] == "too_long"
    size = media["long"].stat().st_size
    gets = proxy.requests("GET", "two-hours.mp4$")
    assert size > 4 << 20 and [g.range for g in gets] == ["bytes=0-4194303"]  # the index, not the media


# -- Redis restarted while jobs run ----------------------------------------------------------------
@pytest.mark.timeout(420)
@pytest.mark.parametrize("outage_s", [120, 1], ids=["ridden-out", "given-up"])
def test_redis_killed_and_restarted_while_jobs_run_loses_nothing(outage_s, s3, fsettings, tmp_path, corpus):
    """Down mid-job: 4 s within DEEPFAKE_REDIS_OUTAGE_S, and the workers reconnect and go on with their
    jobs (no restart, nothing for RQ's maintenance); 8 s past it (1 s), and they exit, as RQ's do, and
    their jobs run again once maintenance finds them (down only 4 s, a slow job's failure handling
    could reach the restarted Redis and retry the job itself, the worker never exiting). Either way
    every job ends with its one verdict."""
    keys = [f"restart-{outage_s}/clip-{i}.mp4" for i in range(6)]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=corpus["h264_mp4"].read_bytes())
    server = DurableRedis(free_ports(1)[0], tmp_path).start()
    # Retries at once (the default backoff is 30 s, then 120 s): what is tested is that no job is lost,
    # not the backoff (tests/test_retry_backoff.py).
    settings = fsettings.model_copy(update={"redis_url": server.url, "job_retries": 3, "job_retry_backoff_s": "0"})
    supervisor = Supervisor(settings, server.url, tmp_path,
                            env={"DEEPFAKE_FRAMES": "24", "DEEPFAKE_REDIS_OUTAGE_S": str(outage_s)})
    try:
        redis = Redis.from_url(server.url)
        job_ids = [enqueue(BUCKET, key, frames=24, settings=settings, connection=redis, s3_client=s3) for key in keys]
        supervisor.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not StartedJobRegistry(queue=get_queue(redis, settings.queue)).count:
            time.sleep(0.05)
        assert StartedJobRegistry(queue=get_queue(redis, settings.queue)).count, supervisor.logs()
        server.crash()  # mid-job: the workers lose Redis with work in hand
        time.sleep(4 if outage_s > 4 else 8)
        server.start()  # same port, same append-only file
        statuses = wait_until_final(lambda: Redis.from_url(server.url), job_ids, supervisor, timeout=300)
        redis = Redis.from_url(server.url)
        assert set(statuses.values()) == {"finished"}, (statuses, supervisor.logs())
        for job_id, key in zip(job_ids, keys):
            result = job_state(job_id, settings=settings, connection=redis).result
            [only] = stored(s3, settings, key)  # exactly one verdict object, whole (it parsed)
            assert result["status"] == "ok" and only["created_at"] == result["created_at"], key
        print(f"worker restarts: {supervisor.restarts}, jobs recovered by maintenance: {supervisor.recovered}, "
              f"dequeues whose reply was lost: {supervisor.unclaimed}")
        if outage_s > 4:
            # No worker gave up a job it held. A job whose BLMOVE ran just before the crash, its reply
            # lost, waits in RQ's intermediate list for maintenance (docs/operations.md): that is
            # Redis's at-most-once reply, not a worker losing work, so it is counted apart.
            assert supervisor.restarts == 0 and supervisor.recovered == 0, supervisor.logs()
            assert '"event": "redis_reachable"' in supervisor.logs(None)
        else:
            assert supervisor.restarts > 0, supervisor.logs()
    finally:
        supervisor.stop()
        if server.proc and server.proc.poll() is None:
            stop(server.proc)


# -- two workers racing on one object --------------------------------------------------------------
def test_two_runtimes_racing_write_one_verdict_and_both_return_it(s3, fsettings, moderator, s3_server):
    """Deterministic: B computes, A finishes and stores in between, B's conditional write loses."""
    a = runtime(fsettings, moderator, s3_server.endpoint)
    b = runtime(fsettings, moderator, s3_server.endpoint)
    inner = b.moderator.moderate
    raced: dict[str, dict] = {}

    class Interleaved:
        def __getattr__(self, name):
            return getattr(moderator, name)

        def moderate(self, source, frames=None, **kwargs):
            verdict = inner(source, frames=frames, **kwargs)
            raced["b"] = dict(verdict)  # what B computed, before A's verdict lands
            raced["a"] = a.moderate_s3(BUCKET, KEYS["carphone"])  # A wins the race while B is still scoring
            return verdict

    b.moderator = Interleaved()
    with capture_logs() as logs:
        theirs = b.moderate_s3(BUCKET, KEYS["carphone"])
    mine, won = raced["b"], raced["a"]
    assert won["status"] == "ok" and mine["created_at"] != won["created_at"]  # two verdicts to tell apart
    [only] = stored(s3, fsettings, KEYS["carphone"])
    # B's write lost: both the stored verdict and the one B returns are A's, not the one B computed.
    assert only["created_at"] == won["created_at"] != mine["created_at"]
    assert theirs["created_at"] == won["created_at"] and theirs["score"] == only["score"] == won["score"]
    events = [e["event"] for e in logs]
    assert events.count("verdict_race_lost") == 1, events  # B's, alone: A's write was the first


def test_a_race_lost_to_another_question_returns_and_stores_this_jobs_answer(s3, fsettings, moderator, s3_server):
    """A (4 frames) stores while B (8 frames: another enqueue's --frames, or a worker of the next
    release) scores the same bytes: A's verdict does not answer B's question, as a stored one read
    before scoring would not have, so B's replaces it and is B's result. 0.4.5 returned A's."""
    a = runtime(fsettings, moderator, s3_server.endpoint)
    b = runtime(fsettings, moderator, s3_server.endpoint)
    inner = b.moderator.moderate

    class Interleaved:
        def __getattr__(self, name):
            return getattr(moderator, name)

        def moderate(self, source, frames=None, **kwargs):
            verdict = inner(source, frames=frames, **kwargs)
            a.moderate_s3(BUCKET, KEYS["carphone"], frames=4)  # A wins the race while B is still scoring
            return verdict

    b.moderator = Interleaved()
    with capture_logs() as logs:
        mine = b.moderate_s3(BUCKET, KEYS["carphone"], frames=8)
    assert mine["input"]["frames"] == 8 and mine["video"]["frames_sampled"] == 8
    [only] = stored(s3, fsettings, KEYS["carphone"])
    assert only["created_at"] == mine["created_at"] and only["input"]["frames"] == 8
    events = [e["event"] for e in logs]
    assert "verdict_race_lost" in events and "verdict_for_another_question_replaced" in events, events


@pytest.mark.timeout(300)
def test_two_worker_processes_given_one_object_at_once_write_one_verdict(s3, redis_server, fsettings, tmp_path):
    """Two real worker processes take two jobs for one upload together. Whether their writes race (one
    loses) or the second starts after the first stored and reuses it depends on timing: either way one
    verdict is written and both jobs return it. The race itself, forced: the in-process test above."""
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    settings = fsettings.model_copy(update={"redis_url": redis_server.url})
    supervisor = Supervisor(settings, redis_server.url, tmp_path).start()
    try:
        from rq import Worker

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both loaded and listening
            workers = Worker.all(connection=redis)
            if len(workers) == 2 and all(w.get_state() == "idle" for w in workers):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"workers never became idle\n{supervisor.logs()}")
        queue = get_queue(redis, settings.queue)
        ids = [queue.enqueue(MODERATE_FUNC, args=(BUCKET, KEYS["carphone"]), kwargs={"frames": 8},
                             job_timeout=120, retry=Retry(max=1)).id for _ in range(2)]  # no dedupe: a raw double
        statuses = wait_until_final(lambda: redis, ids, supervisor, timeout=180)
        assert set(statuses.values()) == {"finished"}, supervisor.logs()
        a, b = (job_state(j, settings=settings, connection=redis).result for j in ids)
        assert a["created_at"] == b["created_at"] and a["score"] == b["score"]
        [only] = stored(s3, settings, KEYS["carphone"])
        assert only["created_at"] == a["created_at"]
        logs = supervisor.logs(tail=None)
        assert logs.count('"job_done"') == 2
        assert "verdict_race_lost" in logs or "verdict_reused" in logs  # the second one did not write
    finally:
        supervisor.stop()
