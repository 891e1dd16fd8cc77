"""The queue worker end to end against a real redis-server and a real S3 server (SeaweedFS) on loopback."""
from __future__ import annotations

import base64
import json
import time
import zlib
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from verdict_schema import assert_valid_verdict
from workers import abandon, burst, queue_settings

from worker.decode import Limits, VideoReader
from worker.pipeline import Moderator
from worker.maintenance import clean_abandoned, release_due_retries
from worker.queue import enqueue, get_queue, job_state, queue_status
from worker.runtime import WorkerRuntime
from worker.s3 import S3Location, S3Source

BUCKET = "uploads"
UPLOADS = {
    "carphone": "clips/carphone.mp4",
    "h264_mp4": "clips/moov-at-end.mp4",
    "vp9_webm": "clips/vp9.webm",
    "no_face_mp4": "clips/noface.mp4",
    "truncated_mp4": "clips/cut-short.mp4",
    "damaged_tail_mp4": "bad/damaged.mp4",
    "zero_bytes_mp4": "bad/zero.mp4",
    "text_mp4": "bad/text.mp4",
    "audio_only_mp4": "bad/audio.mp4",
}
EXPECTED = {
    "carphone": ("ok", None), "h264_mp4": ("ok", None), "vp9_webm": ("ok", None), "no_face_mp4": ("no_face", None),
    "truncated_mp4": ("ok", None), "damaged_tail_mp4": ("error", "corrupt"), "zero_bytes_mp4": ("error", "not_a_video"),
    "text_mp4": ("error", "not_a_video"), "audio_only_mp4": ("error", "no_video_stream"),
}


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket="private")
    for name, key in UPLOADS.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=corpus[name].read_bytes(), ContentType="video/mp4")
    client.put_object(Bucket="private", Key="clips/carphone.mp4", Body=corpus["carphone"].read_bytes())
    return client


@pytest.fixture()
def qsettings(random_model_dir, redis_server, s3_server, tmp_path):
    return queue_settings(random_model_dir, redis_server, s3_server, tmp_path, BUCKET, job_retries=2)


def stored_verdict(s3, settings, key):
    body = s3.get_object(Bucket=BUCKET, Key=f"{settings.verdict_prefix}{key}.json")["Body"].read()
    return json.loads(body)


def test_ranged_reader_reaches_an_index_at_the_end_without_reading_everything(s3, tmp_path):
    from media import encode, scenery_frames

    path = encode(tmp_path / "long.mp4", scenery_frames(250, size=(240, 320)), rate=25, options={"crf": "10"})
    data = path.read_bytes()
    assert data.rfind(b"moov") > len(data) * 0.9  # PyAV's muxer wrote the index after the media data
    s3.put_object(Bucket=BUCKET, Key="clips/long.mp4", Body=data)
    source = S3Source.resolve(s3, S3Location(BUCKET, "clips/long.mp4"), max_bytes=10**9,
                              allowed_buckets=frozenset({BUCKET}))
    reader = source.open()
    reader._block_size = 64 * 1024
    with VideoReader(reader, Limits(100, 10**8, 60)) as video:
        assert video.info.codec == "h264" and video.info.duration_s == pytest.approx(10.0, abs=0.1)
        fetched = reader.requests * reader._block_size
        assert fetched < len(data) / 4, (fetched, len(data))  # opened by seeking, not by downloading
        frames = list(video.sample(4))
    assert len(frames) == 4 and frames[-1].t > 8.0


def test_end_to_end_verdicts_in_redis_and_s3(s3, redis, qsettings, moderator):
    ids = {name: enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
           for name, key in UPLOADS.items()}
    assert get_queue(redis, "deepfake").count == len(UPLOADS)
    burst(redis, qsettings, moderator)
    for name, job_id in ids.items():
        state = job_state(job_id, settings=qsettings, connection=redis)
        assert state.status == "finished", (name, state.error)
        status, code = EXPECTED[name]
        verdict = state.result
        assert verdict["status"] == status and (verdict["error"] or {}).get("code") == code, (name, verdict["error"])
        assert verdict["source"] == f"s3://{BUCKET}/{UPLOADS[name]}"
        stored = stored_verdict(s3, qsettings, UPLOADS[name])
        assert stored["created_at"] == verdict["created_at"] and stored["status"] == status
        # The job result is the stored verdict's summary: no face records, whatever the video.
        assert "faces" not in assert_valid_verdict(verdict) and "faces" in assert_valid_verdict(stored)
        assert verdict["detail"] == {"level": "summary", "faces": len(stored["faces"]), "tracks": len(stored["tracks"])}
        assert {t["id"]: t["frames_seen"] for t in verdict["tracks"]} == {t["id"]: len(t["frames"]) for t in stored["tracks"]}
        assert verdict["stored_at"] == f"s3://{BUCKET}/{qsettings.verdict_prefix}{UPLOADS[name]}.json"
        if name != "zero_bytes_mp4":
            assert stored["input"]["etag"] and stored["input"]["frames"] == 8
            assert stored["input"]["max_sample_gap_s"] == qsettings.max_sample_gap_s == 5.0
    carphone = job_state(ids["carphone"], settings=qsettings, connection=redis).result
    assert carphone["video"]["frames_with_face"] == 8 and carphone["video"]["frames_sampled"] == 8
    status = queue_status(settings=qsettings, connection=redis)
    assert status["queued"] == 0 and status["finished"] == len(UPLOADS) and status["failed"] == 0
    assert status["oldest_waiting_s"] == 0
    assert status["redis_memory"]["used_bytes"] > 0 and status["redis_memory"]["maxmemory_bytes"] == 0  # none set


def test_a_full_job_result_is_the_whole_stored_verdict(s3, redis, qsettings, moderator):
    full = qsettings.model_copy(update={"result_detail": "full"})
    job_id = enqueue(BUCKET, UPLOADS["carphone"], settings=full, connection=redis, s3_client=s3)
    burst(redis, full, moderator)
    result = assert_valid_verdict(job_state(job_id, settings=full, connection=redis).result)
    stored = stored_verdict(s3, full, UPLOADS["carphone"])
    assert "detail" not in result and len(result["faces"]) == 8
    assert (result["faces"], result["tracks"], result["created_at"]) == (stored["faces"], stored["tracks"],
                                                                          stored["created_at"])


def test_result_full_reads_the_verdict_where_the_worker_stored_it(s3, redis, qsettings, moderator, monkeypatch,
                                                                  capsys):
    """`deepfake result --full` on a machine whose verdict prefix is not the workers': the job's result
    says where the verdict is; once it is erased, the command says so and exits 1."""
    from worker.cli import main

    job_id = enqueue(BUCKET, UPLOADS["carphone"], settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    monkeypatch.setenv("DEEPFAKE_REDIS_URL", qsettings.redis_url)
    monkeypatch.setenv("DEEPFAKE_S3_ENDPOINT_URL", qsettings.s3_endpoint_url)
    monkeypatch.setenv("DEEPFAKE_VERDICT_PREFIX", "elsewhere/")
    capsys.readouterr()
    assert main(["result", "--full", job_id]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["result"]["faces"] == stored_verdict(s3, qsettings, UPLOADS["carphone"])["faces"]
    assert full["result"]["stored_at"] == f"s3://{BUCKET}/{qsettings.verdict_prefix}{UPLOADS['carphone']}.json"
    # A result names its verdict's place, and anyone who can write to Redis writes results: another
    # upload's verdict is never read for this one.
    from worker.cli import _with_full_verdict
    from worker.settings import Settings

    other = enqueue(BUCKET, UPLOADS["vp9_webm"], settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    forged = {**full, "result": {**full["result"], "stored_at": job_state(other, settings=qsettings,
                                                                            connection=redis).result["stored_at"]}}
    shown, gone = _with_full_verdict(forged, Settings())
    assert gone and shown["result"]["source"] == full["result"]["source"]  # looked for where this machine keeps it
    s3.delete_object(Bucket=BUCKET, Key=f"{qsettings.verdict_prefix}{UPLOADS['carphone']}.json")
    assert main(["result", "--full", job_id]) == 1
    assert json.loads(capsys.readouterr().out)["error"].startswith("no verdict stored at s3://")


def test_result_full_never_shows_a_later_jobs_verdict_as_this_ones(s3, redis, qsettings, moderator, monkeypatch,
                                                                    capsys):
    """The upload replaced and moderated again: the verdict at `stored_at` is the second job's. 0.4.4
    printed it as the first job's (`no_face` under a job whose summary said `ok`), exit 0."""
    from worker.cli import main

    key = "clips/replaced-later.mp4"
    body = s3.get_object(Bucket=BUCKET, Key=UPLOADS["carphone"])["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="video/mp4")
    first = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    body = s3.get_object(Bucket=BUCKET, Key=UPLOADS["no_face_mp4"])["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="video/mp4")
    second = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    assert stored_verdict(s3, qsettings, key)["status"] == "no_face"
    monkeypatch.setenv("DEEPFAKE_REDIS_URL", qsettings.redis_url)
    monkeypatch.setenv("DEEPFAKE_S3_ENDPOINT_URL", qsettings.s3_endpoint_url)
    capsys.readouterr()
    assert main(["result", "--full", first]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["result"]["status"] == "ok" and "faces" not in shown["result"]  # its own summary
    assert "is another job's" in shown["error"] and shown["verified"] is None
    assert main(["result", "--full", second]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["status"] == "no_face"


def test_result_full_fails_a_verdict_whose_signature_does_not_match(s3, redis, qsettings, moderator, monkeypatch,
                                                                    capsys):
    """A stored verdict edited after signing: `result --full` says `verified: false` and exits 1, as
    `deepfake verdict` does (0.4.5 exited 0)."""
    from pydantic import SecretStr

    from worker.cli import main

    signed = qsettings.model_copy(update={"verdict_secret": SecretStr("verdict-key"),
                                          "verdict_prefix": "signed-result/"})
    job_id = enqueue(BUCKET, UPLOADS["carphone"], settings=signed, connection=redis, s3_client=s3)
    burst(redis, signed, moderator)
    monkeypatch.setenv("DEEPFAKE_REDIS_URL", signed.redis_url)
    monkeypatch.setenv("DEEPFAKE_S3_ENDPOINT_URL", signed.s3_endpoint_url)
    monkeypatch.setenv("DEEPFAKE_VERDICT_SECRET", "verdict-key")
    capsys.readouterr()
    assert main(["result", "--full", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    key = f"{signed.verdict_prefix}{UPLOADS['carphone']}.json"
    obj = s3.get_object(Bucket=BUCKET, Key=key)
    edited = dict(json.loads(obj["Body"].read()), label="edited")  # the same job's, its signature kept
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(edited).encode(), Metadata=obj["Metadata"])
    assert main(["result", "--full", job_id]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] is False and shown["result"]["label"] == "edited"


def test_a_job_answered_by_its_stored_verdict_logs_job_done_too(s3, qsettings, moderator):
    """Every job ends with a `job_done` line (the README), a reused verdict's too (0.4.4 logged none)."""
    from structlog.testing import capture_logs

    rt = WorkerRuntime(qsettings, moderator=moderator, s3_client=s3)
    first = rt.moderate_s3(BUCKET, UPLOADS["vp9_webm"])
    with capture_logs() as logs:
        again = rt.moderate_s3(BUCKET, UPLOADS["vp9_webm"])
    assert again["created_at"] == first["created_at"]  # reused, not computed again
    events = [e["event"] for e in logs]
    assert events.index("verdict_reused") < events.index("job_done")
    [done] = [e for e in logs if e["event"] == "job_done"]
    assert done["reused"] is True and done["status"] == first["status"]


def test_an_error_verdicts_job_done_line_says_why(s3, qsettings, moderator):
    """`access_denied` alone did not say whether the allow-list or S3 refused, and such verdicts are
    not stored to be read: the line carries the verdict's message (0.4.5 logged the code only)."""
    from structlog.testing import capture_logs

    rt = WorkerRuntime(qsettings, moderator=moderator, s3_client=s3)
    with capture_logs() as logs:
        refused = rt.moderate_s3("private", "clips/carphone.mp4")
        fine = rt.moderate_s3(BUCKET, UPLOADS["carphone"])
    first, second = [e for e in logs if e["event"] == "job_done"]
    assert first["code"] == refused["error"]["code"] == "access_denied"
    assert first["error"] == refused["error"]["message"] and "allow-list" in first["error"]
    assert fine["status"] == "ok" and second["code"] is None and "error" not in second


def test_missing_key_and_forbidden_bucket(s3, redis, qsettings, moderator):
    missing = enqueue(BUCKET, "clips/never-uploaded.mp4", settings=qsettings, connection=redis, s3_client=s3)
    private = enqueue("private", "clips/carphone.mp4", settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    v = job_state(missing, settings=qsettings, connection=redis).result
    assert v["status"] == "error" and v["error"]["code"] == "not_found"
    assert stored_verdict(s3, qsettings, "clips/never-uploaded.mp4")["error"]["code"] == "not_found"
    v = job_state(private, settings=qsettings, connection=redis).result
    assert v["error"]["code"] == "access_denied" and "allow-list" in v["error"]["message"]
    with pytest.raises(s3.exceptions.NoSuchKey):  # nothing written where the worker may not read
        s3.get_object(Bucket="private", Key=f"{qsettings.verdict_prefix}clips/carphone.mp4.json")
    # Every refusal carries the card's threshold, as every other verdict does (an integrator reads it).
    inside = WorkerRuntime(qsettings, moderator=moderator).moderate_s3(BUCKET, f"{qsettings.verdict_prefix}a.mp4.json")
    assert inside["error"]["code"] == "access_denied" and v["threshold"] == inside["threshold"] == moderator.threshold


def test_duplicate_enqueue_returns_the_existing_job_then_the_stored_verdict(s3, redis, qsettings, moderator):
    key = UPLOADS["carphone"]
    burst(redis, qsettings, moderator)  # a worker has started: the model and policy it runs are published
    first = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    assert enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3) == first  # still queued
    assert get_queue(redis, "deepfake").count == 1
    burst(redis, qsettings, moderator)
    assert enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3) == first  # finished
    original = job_state(first, settings=qsettings, connection=redis).result
    # With the dedupe record gone (e.g. Redis was flushed), the worker serves the verdict stored in S3.
    for k in redis.scan_iter("deepfake:dedupe:*"):
        redis.delete(k)
    again = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    assert again != first
    burst(redis, qsettings, moderator)
    reused = job_state(again, settings=qsettings, connection=redis).result
    assert reused["created_at"] == original["created_at"] and reused["score"] == original["score"]
    # A job finished by another worker version is no answer (its decoder may have read the upload
    # otherwise): a new job, which reuses the verdict stored in S3 where that still answers.
    published = json.loads(redis.get("deepfake:model:deepfake"))
    redis.set("deepfake:model:deepfake", json.dumps({**published, "worker_version": "0.1.0"}))
    older = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    redis.set("deepfake:model:deepfake", json.dumps(published))
    assert older not in (first, again) and enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3) == again
    # Other sampling is another question: computed anew.
    other = enqueue(BUCKET, key, frames=4, settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    fresh = job_state(other, settings=qsettings, connection=redis).result
    assert fresh["video"]["frames_sampled"] == 4 and fresh["created_at"] != original["created_at"]


def test_a_lost_model_record_is_published_again_by_the_next_maintenance_pass(s3, redis, qsettings, moderator):
    """Redis restarted empty under running workers: the record enqueuers match duplicates against was
    gone until a worker started (every enqueue a new job, `deepfake status` model null). A maintenance
    pass writes it again, and never over another worker's (the last to start is the one named)."""
    worker = burst(redis, qsettings, moderator)
    # A burst worker's scheduler has ended: RQ's maintenance would start it again, forking this
    # process (pytest) into a scheduler that outlives the test and holds the queue's scheduler lock.
    worker.scheduler = None
    published = redis.get("deepfake:model:deepfake")
    redis.delete("deepfake:model:deepfake")
    worker.run_maintenance_tasks()
    assert redis.get("deepfake:model:deepfake") == published
    newer = json.dumps({**json.loads(published), "worker_version": "9.9.9"})
    redis.set("deepfake:model:deepfake", newer)  # a worker that started later
    worker.run_maintenance_tasks()
    assert redis.get("deepfake:model:deepfake").decode() == newer
    assert queue_status(settings=qsettings, connection=redis)["model"]["worker_version"] == "9.9.9"


def test_a_duplicate_keeps_its_callers_webhook_and_priority(s3, redis, qsettings, moderator):
    """The duplicate's answer is the live job only where that job will tell this caller: another receiver
    gets a job of its own (which reuses the stored verdict); `--front` moves a waiting duplicate ahead."""
    burst(redis, qsettings, moderator)
    kw = dict(settings=qsettings, connection=redis, s3_client=s3)
    first, second = (enqueue(BUCKET, UPLOADS[n], webhook_url="http://a.example/", **kw) for n in ("carphone", "h264_mp4"))
    assert enqueue(BUCKET, UPLOADS["carphone"], webhook_url="http://a.example/", **kw) == first
    assert enqueue(BUCKET, UPLOADS["carphone"], **kw) == first  # no receiver of its own: the live job answers
    other = enqueue(BUCKET, UPLOADS["carphone"], webhook_url="http://b.example/", **kw)
    assert other != first and get_queue(redis, "deepfake").job_ids == [first, second, other]
    assert enqueue(BUCKET, UPLOADS["h264_mp4"], at_front=True, **kw) == second
    assert get_queue(redis, "deepfake").job_ids == [second, first, other]


def test_the_same_upload_enqueued_at_once_makes_one_job(s3, redis, redis_server, qsettings, moderator):
    """S3 delivers an event more than once, sometimes together: enqueuers racing on one upload share
    one job (its duplicate record is claimed atomically). Another enqueue's claim is waited for until
    it expires (that enqueue died before making its job); a record naming a job that is gone is taken
    over at once."""
    import threading

    from redis import Redis

    from worker.queue import claim_duplicate

    burst(redis, qsettings, moderator)  # the published model: duplicates are matched
    etag = s3.head_object(Bucket=BUCKET, Key=UPLOADS["carphone"])["ETag"]
    gate, ids = threading.Barrier(8), []

    def enqueuer():
        connection = Redis.from_url(redis_server.url)
        gate.wait()
        ids.append(enqueue(BUCKET, UPLOADS["carphone"], etag=etag, settings=qsettings, connection=connection))

    threads = [threading.Thread(target=enqueuer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue = get_queue(redis, "deepfake")
    assert len(set(ids)) == 1 and queue.job_ids == ids[:1], (ids, queue.job_ids)

    [dkey] = [k.decode() for k in redis.scan_iter("deepfake:dedupe:*")]
    assert redis.get(dkey).decode() == ids[0] and 0 < redis.ttl(dkey) <= qsettings.result_ttl_s  # the job, for the TTL

    redis.set(dkey, "pending:never-made", ex=1)  # the claim of an enqueue that died before making its job
    started = time.monotonic()
    assert claim_duplicate(redis, dkey, "mine", accept=lambda job: True) is None
    assert 0.5 <= time.monotonic() - started < 5 and redis.get(dkey) == b"pending:mine"
    redis.set(dkey, "gone")  # names a job that no longer exists (deleted by hand, say)
    started = time.monotonic()
    assert claim_duplicate(redis, dkey, "mine", accept=lambda job: True) is None
    assert time.monotonic() - started < 0.5 and redis.get(dkey) == b"pending:mine"
    redis.set(dkey, ids[0])
    assert claim_duplicate(redis, dkey, "mine", accept=lambda job: True).id == ids[0]  # the live job answers


@pytest.mark.parametrize("client", ["no-retries", "redis-py-default"])
def test_an_enqueue_whose_reply_is_lost_returns_the_job_it_made(s3, redis, redis_server, qsettings, moderator,
                                                                 client):
    """Redis queues the job, then the connection is cut before its reply arrives (a restart, a
    failover). A client without retries (Redis.from_url): the enqueue raised and dropped the duplicate
    claim as if nothing had been made, and the caller's retry made a second job for the same bytes.
    One with redis-py's default retries (Redis(host, port): 10) ran the transaction again: the job id
    was queued twice, and ran twice. Now either returns the job it made, queued once and recorded as
    the duplicate record, and the caller's retry gets that job back."""
    from urllib.parse import urlsplit

    from redis import Redis
    from redisproxy import ReplyCutter

    burst(redis, qsettings, moderator)  # the published model: duplicates are matched
    etag = s3.head_object(Bucket=BUCKET, Key=UPLOADS["carphone"])["ETag"]
    from rq.scripts import UNIQUE_ENQUEUE_SCRIPT

    redis.script_load(UNIQUE_ENQUEUE_SCRIPT)  # so that the script's first run is the one cut short

    def enqueues(sent: bytes) -> bool:  # RQ's transaction, or the script that checks, saves and queues
        return (b"EXEC" in sent and b"RPUSH" in sent) or (b"EVALSHA" in sent and b"rq:queue:deepfake" in sent)

    with ReplyCutter(redis_server.port, when=enqueues) as cut:
        connection = (Redis.from_url(cut.url) if client == "no-retries"
                      else Redis(host="127.0.0.1", port=urlsplit(cut.url).port))
        job_id = enqueue(BUCKET, UPLOADS["carphone"], etag=etag, settings=qsettings, connection=connection)
        assert cut.fired.is_set()
        assert enqueue(BUCKET, UPLOADS["carphone"], etag=etag, settings=qsettings, connection=connection) == job_id
    assert get_queue(redis, "deepfake").job_ids == [job_id]
    [dkey] = [k.decode() for k in redis.scan_iter("deepfake:dedupe:*")]
    assert redis.get(dkey).decode() == job_id


def test_queues_sharing_one_redis_keep_their_own_duplicates(s3, redis, qsettings, moderator):
    key = UPLOADS["carphone"]
    other = qsettings.model_copy(update={"queue": "deepfake-other"})
    first = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    elsewhere = enqueue(BUCKET, key, settings=other, connection=redis, s3_client=s3)
    assert elsewhere != first  # it used to return the other queue's job, which this queue's workers never run
    assert get_queue(redis, "deepfake").job_ids == [first] and get_queue(redis, "deepfake-other").job_ids == [elsewhere]
    assert enqueue(BUCKET, key, settings=other, connection=redis, s3_client=s3) == elsewhere


def test_a_changed_decision_policy_rescores_the_upload(s3, redis, qsettings, moderator):
    key = UPLOADS["carphone"]
    burst(redis, qsettings, moderator)
    first = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    original = job_state(first, settings=qsettings, connection=redis).result
    assert original["action"] == "block" and original["decision"]["policy"]["review_threshold"] is None
    # The workers restart with a review band: neither Redis's finished job nor the verdict in S3 answers.
    banded = qsettings.model_copy(update={"review_threshold": 0.3})
    rescorer = Moderator(banded, detector=moderator.detector, engine=moderator.engine)
    burst(redis, banded, rescorer)
    again = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    assert again != first
    burst(redis, banded, rescorer)
    fresh = job_state(again, settings=qsettings, connection=redis).result
    assert fresh["created_at"] != original["created_at"] and fresh["decision"]["policy"]["review_threshold"] == 0.3
    assert stored_verdict(s3, qsettings, key)["created_at"] == fresh["created_at"]  # replaced in S3
    assert enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3) == again  # same policy: same job


def test_a_changed_sampling_gap_rescores_the_upload(s3, redis, qsettings, moderator):
    """Workers restarted with another DEEPFAKE_MAX_SAMPLE_GAP_S sample anew: the duplicate record and
    the stored verdict were made under the old gap."""
    key = UPLOADS["vp9_webm"]
    burst(redis, qsettings, moderator)
    first = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    burst(redis, qsettings, moderator)
    original = job_state(first, settings=qsettings, connection=redis).result
    assert original["video"]["frames_sampled"] == 8  # 3.75 s: 8 frames lie well within 5 s
    denser = qsettings.model_copy(update={"max_sample_gap_s": 0.25})
    resampler = Moderator(denser, detector=moderator.detector, engine=moderator.engine)
    burst(redis, denser, resampler)  # publishes the new gap
    again = enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3)
    assert again != first
    burst(redis, denser, resampler)
    fresh = job_state(again, settings=qsettings, connection=redis).result
    assert fresh["video"]["frames_sampled"] == 15 and fresh["input"]["max_sample_gap_s"] == 0.25
    assert stored_verdict(s3, qsettings, key)["created_at"] == fresh["created_at"]  # replaced in S3
    assert enqueue(BUCKET, key, settings=qsettings, connection=redis, s3_client=s3) == again


TIME_STYLES = {  # ISO-8601 UTC as each writes it by default
    "rq": lambda t: time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(t)),
    "go-rfc3339nano": lambda t: time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime(t)),
    "python-isoformat": lambda t: time.strftime("%Y-%m-%dT%H:%M:%S.123456+00:00", time.gmtime(t)),
    "js-toisostring": lambda t: time.strftime("%Y-%m-%dT%H:%M:%S.123Z", time.gmtime(t)),
    "offset": lambda t: time.strftime("%Y-%m-%dT%H:%M:%S+09:00", time.gmtime(t + 9 * 3600)),
}


def test_a_job_time_without_a_zone_is_left_for_rq_to_refuse():
    from worker.timestamps import in_rq_format, parse_utc

    with pytest.raises(ValueError, match="names no zone"):
        parse_utc("2026-12-01T00:36:06")
    raw = {b"created_at": b"2026-12-01T00:36:06", b"enqueued_at": b"2026-12-01T09:36:06.5+09:00", b"data": b"x"}
    assert in_rq_format(raw) == {**raw, b"enqueued_at": b"2026-12-01T00:36:06.500000Z"}


@pytest.mark.parametrize("style", TIME_STYLES)
def test_a_non_python_client_can_enqueue_with_plain_redis_commands(s3, redis, qsettings, moderator, style):
    """The README's payload, written with raw commands as a Go or Node client would, its times as that
    language writes ISO-8601 UTC: RQ reads one format only, and 0.4.4 skipped the others' jobs as
    malformed (left queued for ever, no result, no webhook; `deepfake status` failed on them)."""
    job_id = f"4c0ffee0-0000-4000-8000-{list(TIME_STYLES).index(style):012d}"
    payload = json.dumps(["worker.jobs.moderate_s3_object", None, [BUCKET, UPLOADS["vp9_webm"]], {"frames": 4}])
    now = TIME_STYLES[style](time.time() - 30)
    redis.hset(f"rq:job:{job_id}", mapping={
        "data": zlib.compress(payload.encode()), "created_at": now, "enqueued_at": now, "status": "queued",
        "origin": "deepfake", "description": "from another language", "timeout": 600, "result_ttl": 3600,
        "failure_ttl": 3600, "retries_left": 3, "retry_intervals": "[0]",
    })
    redis.sadd("rq:queues", "rq:queue:deepfake")
    redis.rpush("rq:queue:deepfake", job_id)
    waiting = queue_status(settings=qsettings, connection=redis)
    assert waiting["queued"] == 1 and 25 < waiting["oldest_waiting_s"] < 300, waiting
    burst(redis, qsettings, moderator)
    # ... and the result read back as the README says, with plain commands.
    assert redis.hget(f"rq:job:{job_id}", "status") == b"finished"
    [(_, entry)] = redis.xrevrange(f"rq:results:{job_id}", count=1)
    assert entry[b"type"] == b"1"
    result = json.loads(base64.b64decode(entry[b"return_value"]))
    assert result["status"] == "ok" and result["video"]["codec"] == "vp9" and result["video"]["frames_sampled"] == 4
    assert result == job_state(job_id, settings=qsettings, connection=redis).result


def test_a_pickled_job_is_never_run(s3, redis, qsettings, moderator, tmp_path):
    marker = tmp_path / "pwned"
    queue = Queue("deepfake", connection=redis)  # RQ's default serializer: pickle
    job = queue.enqueue(Path.touch, marker)
    burst(redis, qsettings, moderator)
    assert not marker.exists()
    assert Job.fetch(job.id, connection=redis, serializer=JSONSerializer).get_status() != "finished"


def test_worker_uploads_the_report_next_to_the_verdict(s3, redis, qsettings, moderator):
    settings = qsettings.model_copy(update={"upload_reports": True})
    job_id = enqueue(BUCKET, UPLOADS["carphone"], settings=settings, connection=redis, s3_client=s3)
    burst(redis, settings, moderator)
    verdict = job_state(job_id, settings=settings, connection=redis).result
    prefix = f"{settings.verdict_prefix}{UPLOADS['carphone']}.report/"
    assert verdict["report"] == f"s3://{BUCKET}/{prefix}index.html"
    listed = {o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {"index.html", "verdict.json", "scores.png", "top_0.png", "gradcam_rgb_0.png"} <= listed
    page = s3.get_object(Bucket=BUCKET, Key=prefix + "index.html")
    assert page["ContentType"].startswith("text/html") and b"Deepfake report" in page["Body"].read()
    assert stored_verdict(s3, settings, UPLOADS["carphone"])["report"] == verdict["report"]


def test_a_finished_job_answers_its_duplicates_only_as_its_stored_verdict_would(s3, redis, qsettings, moderator):
    """A timeout or an internal error is worth a new try (as a stored one is, `reusable`); a verdict
    the same bytes always reproduce is not. Nor is the answer of a worker of the version before, which
    in a rolling update finishes jobs queued under the new workers' record (its decoder may have read
    the upload otherwise: 0.4.0 left uploads labelled image/gif unread, `allow`), or of another model."""
    from rq.results import Result

    burst(redis, qsettings, moderator)  # workers publish their model: duplicates are matched on it
    kw = dict(settings=qsettings, connection=redis, s3_client=s3)
    text, scored = enqueue(BUCKET, UPLOADS["text_mp4"], **kw), enqueue(BUCKET, UPLOADS["carphone"], **kw)
    burst(redis, qsettings, moderator)
    assert enqueue(BUCKET, UPLOADS["text_mp4"], **kw) == text  # not_a_video: the same bytes say so again
    big = enqueue(BUCKET, UPLOADS["vp9_webm"], **kw)
    burst(redis, qsettings.model_copy(update={"max_bytes": 1000}), moderator)
    assert job_state(big, settings=qsettings, connection=redis).result["error"]["code"] == "too_large"
    assert enqueue(BUCKET, UPLOADS["vp9_webm"], **kw) == big  # refused by its HEAD, as these workers would again
    real = job_state(scored, settings=qsettings, connection=redis).result
    assert real["status"] == "ok" and enqueue(BUCKET, UPLOADS["carphone"], **kw) == scored
    cases = {
        "timeout": ({**real, "status": "error", "action": "review",
                     "error": {"code": "timeout", "message": "as a worker wrote it"}}, False),
        "internal": ({**real, "status": "error", "action": "review",
                      "error": {"code": "internal", "message": "as a worker wrote it"}}, False),
        "a 0.4.0 worker's": ({**real, "worker_version": "0.4.0"}, False),
        "another model's": ({**real, "model": {**real["model"], "sha256": "0" * 64}}, False),
        "this one's": (real, True),
    }
    for case, (result, answered) in cases.items():
        first = enqueue(BUCKET, UPLOADS["carphone"], **kw)  # the job the duplicate record names now
        job = Job.fetch(first, connection=redis, serializer=JSONSerializer)
        get_queue(redis, qsettings.queue).remove(job.id)  # as a worker that ran it to this end leaves it
        job.set_status("finished")
        Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value=result)
        again = enqueue(BUCKET, UPLOADS["carphone"], **kw)
        assert (again == first) is answered, case
        get_queue(redis, qsettings.queue).empty()


def test_an_uploads_index_drops_the_jobs_that_have_expired_as_new_ones_come(redis, qsettings):
    """Each job for a key re-arms its index's expiry: for a key re-enqueued more often than results
    last (a replaced avatar, S3 events repeated) the index kept every job it ever had, and `deepfake
    forget` fetched them all. Past `PRUNE_ABOVE` members, a record drops those whose hash is gone."""
    from worker import upload_index

    queue, key, live = get_queue(redis, qsettings.queue), "clips/avatar.mp4", []
    for version in range(40):  # the upload replaced 40 times: a new ETag, a new job and duplicate record each
        job_id = enqueue(BUCKET, key, etag=f'"v{version}"', settings=qsettings, connection=redis)
        live.append(job_id)
        if len(live) > 3:  # the job three back has run, and its result and duplicate record expired
            gone = live.pop(0)
            queue.remove(gone)
            redis.delete(Job.key_for(gone))
            [dedupe] = [d for d in upload_index.recorded(redis, BUCKET, key)[1] if redis.get(d) == gone.encode()]
            redis.delete(dedupe)
    jobs, dedupes = upload_index.recorded(redis, BUCKET, key)
    assert len(jobs) + len(dedupes) <= 18  # PRUNE_ABOVE, and the two members of the record past it; not 80
    assert set(live) <= jobs and sorted(redis.get(d).decode() for d in dedupes if redis.exists(d)) == sorted(live)


def test_abandoned_jobs_are_moved_on_once_under_the_workers_maintenance_lock(redis, redis_server, qsettings):
    """`deepfake status` moves abandoned jobs on as RQ's worker maintenance does, under its lock:
    two processes cleaning at once would each requeue a job, and it would run twice (retried at once
    here, so that a job requeued twice shows twice in the queue's list)."""
    import threading

    from redis import Redis

    qsettings = qsettings.model_copy(update={"job_retry_backoff_s": "0"})
    queue = get_queue(redis, qsettings.queue)
    ids = [enqueue(BUCKET, f"clips/abandoned-{i}.mp4", etag="", settings=qsettings, connection=redis)
           for i in range(60)]
    for job_id in ids:
        abandon(redis, job_id, qsettings.queue)
    assert queue.acquire_maintenance_lock()  # a worker is cleaning: status leaves the jobs to it
    assert queue_status(settings=qsettings, connection=redis)["started"] == len(ids)
    assert queue.count == 0
    queue.release_maintenance_lock()
    threads = [threading.Thread(target=queue_status, kwargs={"settings": qsettings,
                                                             "connection": Redis.from_url(redis_server.url)})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each retried (it had retries left) into the scheduled registry, due at once; put on the queue by a
    # status pass that got RQ's scheduler lock, or else by the next pass (a worker's scheduler: every second).
    release_due_retries(queue)
    waiting = queue.get_job_ids()
    assert sorted(waiting) == sorted(ids)  # each requeued, and once
    assert queue_status(settings=qsettings, connection=redis)["started"] == 0
    assert clean_abandoned(queue)  # the lock was released each time
    # A pass that outlives the lock (slow webhooks, a Redis ride-out) gives back only its own: the
    # lock another process took since stays, so no third pass cleans beside that one.
    from worker.maintenance import maintenance_lock

    with maintenance_lock(queue) as first:
        redis.delete(queue.registry_cleaning_key)  # its 899 s ran out
        with maintenance_lock(queue) as second:
            assert first and second
        assert not redis.exists(queue.registry_cleaning_key)
        assert queue.acquire_maintenance_lock()  # a third process, as RQ's workers take it
    assert redis.exists(queue.registry_cleaning_key) and not clean_abandoned(queue)


def test_a_stopping_worker_leaves_abandoned_jobs_to_the_others(redis, qsettings):
    """RQ runs a due maintenance pass after a job before it reads the stop flag: a worker told to stop
    (SIGTERM, its grace period sized for the job in hand) skips it; a running one does it."""
    from worker.rq_worker import DeepfakeWorker

    queue = get_queue(redis, qsettings.queue)
    job_id = enqueue(BUCKET, "clips/abandoned-at-stop.mp4", etag="", settings=qsettings, connection=redis)
    abandon(redis, job_id, qsettings.queue)
    worker = DeepfakeWorker([queue], connection=redis, serializer=JSONSerializer)
    started = queue.started_job_registry.key  # read raw: the registry's own reads clean it up

    worker._stop_requested = True
    worker.run_maintenance_tasks()
    assert [m.decode() for m in redis.zrange(started, 0, -1)] == [f"{job_id}:gone-worker-execution"]
    worker._stop_requested = False
    worker.run_maintenance_tasks()
    assert redis.zrange(started, 0, -1) == []
    assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status() in ("scheduled", "queued")


@pytest.mark.parametrize("carried", [-1, 86_400], ids=["none", "a-day"])
def test_no_job_runs_past_the_limit_the_workers_settings_derive(s3, redis, qsettings, moderator, carried):
    """A job hash can carry any timeout (whoever writes to Redis chooses it): the worker runs it
    under at most the limit its own settings derive for the job's frames, which the pod's grace
    period and the liveness window are sized for (a shorter one stands: test_faults' timeout test)."""
    from rq.registry import StartedJobRegistry

    job_id = enqueue(BUCKET, UPLOADS["vp9_webm"], frames=12, etag="", settings=qsettings, connection=redis)
    redis.hset(Job.key_for(job_id), "timeout", carried)
    expires_in: list[float] = []

    class Watching:  # reads the started registry while the job runs
        def __getattr__(self, name):
            return getattr(moderator, name)

        def moderate(self, source, frames=None, **kwargs):
            [(_, score)] = redis.zrange(StartedJobRegistry(qsettings.queue, connection=redis).key, 0, -1,
                                        withscores=True)
            expires_in.append(score - time.time())
            return moderator.moderate(source, frames=frames, **kwargs)

    burst(redis, qsettings, runtime=WorkerRuntime(qsettings, moderator=Watching()))
    assert job_state(job_id, settings=qsettings, connection=redis).status == "finished"
    limit = qsettings.job_timeout_s(12)
    [left] = expires_in
    assert limit < left <= limit + 60, (left, limit)  # the heartbeat's lease: the limit and RQ's 60 s
