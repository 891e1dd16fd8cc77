"""An upload replaced at its key never keeps the verdict of the bytes it replaced.

Against the real S3 server: a verdict written last by a job for the old bytes, a replacement the
worker refuses at HEAD, and a job that timed out beside a verdict another job wrote for the bytes
there now.
"""
from __future__ import annotations

import pytest
from servers import ensure_bucket
from structlog.testing import capture_logs
from workers import stored

from worker.runtime import WorkerRuntime
from worker.s3 import S3Location
from worker.settings import Settings

BUCKET = "replaced"


@pytest.fixture(scope="module")
def s3(s3_server):
    client = s3_server.client()
    ensure_bucket(client, BUCKET)
    return client


@pytest.fixture()
def rsettings(random_model_dir, s3_server, tmp_path) -> Settings:
    return Settings(model_dir=random_model_dir, s3_endpoint_url=s3_server.endpoint, allowed_buckets=BUCKET, frames=4,
                    metrics_port=0, log_format="json", verdict_prefix=f"v-{tmp_path.name}/")


def put(s3, key: str, body: bytes, content_type: str = "video/mp4") -> str:
    return s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType=content_type)["ETag"]


def test_a_job_for_the_old_bytes_writing_last_does_not_clear_the_new_ones(s3, s3_server, rsettings, moderator, corpus):
    """Job A read the old bytes, job B the new: A's verdict landing first (B's If-None-Match loses) is
    replaced by B's, since what is at the key now is what B judged."""
    key = "clips/replaced-mid-race.mp4"
    old_etag = put(s3, key, corpus["carphone"].read_bytes())
    a = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    old = a.moderate_s3(BUCKET, key)
    assert old["input"]["etag"] == old_etag
    a.store.client.delete_object(Bucket=BUCKET, Key=a.store.location_for(S3Location(BUCKET, key)).key)
    new_etag = put(s3, key, corpus["faststart_mp4"].read_bytes())
    assert new_etag != old_etag
    b = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    inner = b.moderator.moderate

    class LateOldWrite:  # the order a real race can take, made certain: A's write lands while B scores
        def __getattr__(self, name):
            return getattr(moderator, name)

        def moderate(self, source, frames=None, **kwargs):
            verdict = inner(source, frames=frames, **kwargs)
            assert a.store.put(S3Location(BUCKET, key), {k: v for k, v in old.items() if k != "stored_at"})
            return verdict

    b.moderator = LateOldWrite()
    with capture_logs() as logs:
        mine = b.moderate_s3(BUCKET, key)
    [only] = stored(s3, rsettings, key)
    assert only["input"]["etag"] == mine["input"]["etag"] == new_etag
    assert only["created_at"] == mine["created_at"] != old["created_at"]
    events = [e["event"] for e in logs]
    assert "verdict_race_lost" in events and "verdict_for_earlier_bytes_replaced" in events, events


def test_a_replacement_refused_at_head_replaces_the_old_verdict(s3, rsettings, moderator, corpus):
    key = "clips/replaced-by-a-page.mp4"
    put(s3, key, corpus["carphone"].read_bytes())
    rt = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    first = rt.moderate_s3(BUCKET, key)
    assert first["status"] in ("ok", "no_face")
    put(s3, key, b"<html>not a video</html>\n" * 100, content_type="text/html")
    again = rt.moderate_s3(BUCKET, key)
    assert again["status"] == "error" and again["error"]["code"] == "not_a_video", again
    [only] = stored(s3, rsettings, key)
    assert only["error"]["code"] == "not_a_video" and only["created_at"] == again["created_at"]
    big = rsettings.model_copy(update={"max_bytes": 1024})
    put(s3, key, corpus["carphone"].read_bytes())  # a video again, now over the limit
    over = WorkerRuntime(big, moderator=moderator, s3_client=s3).moderate_s3(BUCKET, key)
    assert over["error"]["code"] == "too_large"
    assert stored(s3, rsettings, key)[0]["error"]["code"] == "too_large"


def test_a_timeout_leaves_a_verdict_another_job_wrote_for_the_same_bytes(s3, rsettings, moderator, corpus):
    key = "clips/timed-out-beside-a-verdict.mp4"
    put(s3, key, corpus["carphone"].read_bytes())
    rt = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    judged = rt.moderate_s3(BUCKET, key)
    late = rt.timeout_verdict(BUCKET, key, 600)
    assert late["created_at"] == judged["created_at"] and late["status"] == judged["status"]
    [only] = stored(s3, rsettings, key)
    assert only["created_at"] == judged["created_at"]  # not overwritten by the timeout
    put(s3, key, corpus["faststart_mp4"].read_bytes())  # replaced: the stored verdict is about other bytes
    timed_out = rt.timeout_verdict(BUCKET, key, 600)
    assert timed_out["error"]["code"] == "timeout"
    [only] = stored(s3, rsettings, key)
    assert only["error"]["code"] == "timeout" and only["created_at"] == timed_out["created_at"]


def test_a_timeout_on_a_key_shaped_like_a_feedback_path_writes_nothing(s3, rsettings, moderator, corpus):
    """`a.mp4.feedback`'s verdict path is a.mp4's feedback object: the job refuses the key (unsupported,
    not stored), and so must its timeout verdict, which replaced the reviewer's feedback."""
    rt = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    upload = S3Location(BUCKET, "clips/fb.mp4")
    feedback = rt.store.feedback_location(upload)
    s3.put_object(Bucket=BUCKET, Key=feedback.key, Body=b'{"label": "fake", "reviewer": "r1"}')
    put(s3, "clips/fb.mp4.feedback", corpus["carphone"].read_bytes())
    refused = rt.moderate_s3(BUCKET, "clips/fb.mp4.feedback")
    assert refused["error"]["code"] == "unsupported" and "stored_at" not in refused
    timed_out = rt.timeout_verdict(BUCKET, "clips/fb.mp4.feedback", 600)
    assert timed_out["error"]["code"] == "timeout" and "stored_at" not in timed_out
    kept = s3.get_object(Bucket=BUCKET, Key=feedback.key)["Body"].read()
    assert kept == b'{"label": "fake", "reviewer": "r1"}'


def test_the_same_bytes_refused_at_head_keep_their_verdict(s3, rsettings, moderator, corpus):
    """A refusal replaces only a verdict about other bytes: the same video re-labelled as text, or
    judged under a lowered size limit, keeps its verdict, and a deleted upload keeps its last one
    (the record of what was decided)."""
    key = "clips/relabelled.mp4"
    body = corpus["carphone"].read_bytes()
    put(s3, key, body)
    rt = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    judged = rt.moderate_s3(BUCKET, key)
    put(s3, key, body, content_type="text/plain")  # same bytes, same ETag
    assert rt.moderate_s3(BUCKET, key)["created_at"] == judged["created_at"]
    small = WorkerRuntime(rsettings.model_copy(update={"max_bytes": 1024}), moderator=moderator, s3_client=s3)
    assert small.moderate_s3(BUCKET, key)["created_at"] == judged["created_at"]
    s3.delete_object(Bucket=BUCKET, Key=key)
    rt.moderate_s3(BUCKET, key)
    rt.timeout_verdict(BUCKET, key, 600)
    [only] = stored(s3, rsettings, key)
    assert only["created_at"] == judged["created_at"]


def test_a_job_for_the_old_bytes_storing_last_keeps_the_new_bytes_verdict(s3, rsettings, moderator, corpus):
    """A scores the old bytes; the upload is replaced and B judges and stores the new ones; then A
    stores. B's verdict is about the bytes at the key and stays. (0.4.6's first cut of the race rule
    for verdicts of another question took B's for one and replaced it with A's, about bytes no longer
    there: found by a review of the change, never released.)"""
    key = "clips/old-job-last.mp4"
    put(s3, key, corpus["carphone"].read_bytes())
    a = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    b = WorkerRuntime(rsettings, moderator=moderator, s3_client=s3)
    inner = a.moderator.moderate
    new: dict[str, object] = {}

    class ReplacedWhileScoring:
        def __getattr__(self, name):
            return getattr(moderator, name)

        def moderate(self, source, frames=None, **kwargs):
            verdict = inner(source, frames=frames, **kwargs)  # A scored the old bytes
            new["etag"] = put(s3, key, corpus["faststart_mp4"].read_bytes())  # the upload is replaced
            new["verdict"] = b.moderate_s3(BUCKET, key)  # B judges the new bytes and stores first
            return verdict

    a.moderator = ReplacedWhileScoring()
    mine = a.moderate_s3(BUCKET, key)
    [only] = stored(s3, rsettings, key)
    assert only["input"]["etag"] == new["etag"] and only["created_at"] == new["verdict"]["created_at"]
    assert mine["created_at"] == new["verdict"]["created_at"]  # A returns the verdict stored for the key
