"""S3 failures that are not the upload's fault never become its verdict, and keys whose verdict
could never be written are refused up front. Against the real S3 server, through the fault proxy
serving HTTPS where a TLS failure is wanted."""
from __future__ import annotations

import boto3
import numpy as np
import pytest
from botocore.config import Config
from faultproxy import FaultProxy, Rule
from media import encode
from servers import ensure_bucket
from workers import stored

from worker.errors import TransientError
from worker.queue import enqueue
from worker.runtime import WorkerRuntime
from worker.s3 import S3Location, S3Source
from worker.settings import Settings

BUCKET = "s3errors"
BIG = "big/noise.avi"  # > 4 MiB: a fault can strike the second ranged GET
LONGER = "big/longer-noise.avi"  # six 4 MiB blocks: decoding reads the middle ones after the open


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    client = s3_server.client()
    ensure_bucket(client, BUCKET)
    rng = np.random.default_rng(11)
    for key, frames in ((BIG, 18), (LONGER, 60)):
        path = encode(tmp_path_factory.mktemp("s3errors") / "noise.avi",
                      [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(frames)],
                      codec="mjpeg", pix_fmt="yuvj420p", rate=10, options={"qmin": "1", "qmax": "1"})
        assert path.stat().st_size > 4 << 20
        client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes(), ContentType="video/x-msvideo")
    return client


def through(proxy: FaultProxy):
    """An S3 client reaching the server through the fault proxy (trusting its certificate when it
    serves HTTPS), with botocore's standard retries cut to one."""
    return boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                        verify=str(proxy.ca_bundle) if proxy.ca_bundle else None, config=Config(
                            s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2}))


@pytest.fixture()
def esettings(random_model_dir, s3_server, tmp_path) -> Settings:
    return Settings(model_dir=random_model_dir, s3_endpoint_url=s3_server.endpoint, allowed_buckets=BUCKET, frames=4,
                    metrics_port=0, log_format="json", verdict_prefix=f"v-{tmp_path.name}/")


def test_a_tls_failure_mid_read_fails_the_job_and_writes_nothing(s3, s3_server, esettings, moderator, tmp_path):
    """botocore wraps a reset body, not a TLS record that fails to decrypt (urllib3's own error): that
    one must not end as an `internal` verdict about the upload."""
    with FaultProxy(s3_server.port, tls_dir=tmp_path / "tls") as proxy:
        client = through(proxy)
        rule = proxy.add(Rule("bad_record_mid_body", method="GET", path="noise.avi$",
                              when=lambda req: (req.range_start or 0) > 0))
        rt = WorkerRuntime(esettings, moderator=moderator, s3_client=client)
        with pytest.raises(TransientError, match="reading s3://"):
            rt.moderate_s3(BUCKET, BIG)
        assert rule.hits >= 2  # the reader tried the block again before it gave up
    assert stored(s3, esettings, BIG) == []


def test_the_workers_refused_credentials_fail_the_job_for_a_retry(s3, s3_server, esettings, moderator):
    """HEAD answers a bare 403 whether the object's policy or the worker's own key is at fault; the
    one-byte GET's error code tells: a wrong key is no verdict about the upload."""
    bad = s3_server.client(secret="not-the-secret")
    with pytest.raises(TransientError, match="SignatureDoesNotMatch.*credentials"):
        S3Source.resolve(bad, S3Location(BUCKET, BIG), max_bytes=10**9, allowed_buckets=frozenset({BUCKET}))
    with pytest.raises(TransientError):
        WorkerRuntime(esettings, moderator=moderator, s3_client=bad).moderate_s3(BUCKET, BIG)
    assert stored(s3, esettings, BIG) == []


@pytest.mark.parametrize("key, why", [
    ("/".join(["x" * 199] * 5), "too long"),  # 999 bytes: within S3's 1024, but not its verdict and report paths
    ("clips/a.mp4.report/b.mp4", "report path"),  # its verdict would sit inside a.mp4's report (erased with it)
    ("clips/a.mp4.feedback", "feedback"),  # its verdict would be a.mp4's reviewer feedback object
], ids=["too-long", "inside-a-report", "a-feedback-object"])
def test_keys_whose_verdict_cannot_stand_apart_are_refused_before_any_write(s3, esettings, moderator, key, why):
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"\0" * 64, ContentType="video/mp4")
    with pytest.raises(ValueError, match=why):
        enqueue(BUCKET, key, settings=esettings, connection=object(), s3_client=s3)
    v = WorkerRuntime(esettings, moderator=moderator, s3_client=s3).moderate_s3(BUCKET, key)
    assert v["status"] == "error" and v["error"]["code"] == "unsupported" and v["action"] == "review", v
    assert "stored_at" not in v


def test_a_decode_timed_out_on_a_slow_store_fails_the_job_instead_of_a_timeout_verdict(s3, s3_server, esettings):
    """Decoding's wall-clock limit counts S3's time too: a store answering slowly must not turn
    uploads into final `timeout` verdicts: spent mostly waiting on slow GETs, it is a storage failure.
    Spent on many quick ones, it stays a verdict (as a decode too slow on its own does: test_decode)."""
    from worker.pipeline import Moderator

    tight = esettings.model_copy(update={"decode_timeout_s": 2.0})
    with FaultProxy(s3_server.port) as proxy:
        rule = proxy.add(Rule("delay", method="GET", path="longer-noise.avi$", delay_s=1.5))
        client = through(proxy)
        rt = WorkerRuntime(tight, moderator=Moderator(tight), s3_client=client)
        with pytest.raises(TransientError, match="waiting on S3"):
            rt.moderate_s3(BUCKET, LONGER)
        assert rule.hits >= 2
        assert stored(s3, tight, LONGER) == []
        # RQ's last try: a verdict all the same (review), so no upload can be made to end without one
        last = rt.moderate_s3(BUCKET, LONGER, final_attempt=True)
    assert last["error"]["code"] == "timeout" and last["action"] == "review"
    assert stored(s3, tight, LONGER)[0]["created_at"] == last["created_at"]
    # Many quick GETs (what an upload built to seek all over would cost) are the upload's own doing.
    quick = esettings.model_copy(update={"decode_timeout_s": 0.5})
    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule("delay", method="GET", path="longer-noise.avi$", delay_s=0.2))
        client = through(proxy)
        v = WorkerRuntime(quick, moderator=Moderator(quick), s3_client=client).moderate_s3(BUCKET, LONGER)
    assert v["error"]["code"] == "timeout" and stored(s3, quick, LONGER)[0]["error"]["code"] == "timeout"


def test_through_rq_a_slow_store_is_retried_then_the_last_try_gives_the_timeout_verdict(
        s3, s3_server, redis, redis_server, esettings):
    from rq.job import Job
    from rq.serializers import JSONSerializer
    from workers import burst

    from worker.pipeline import Moderator
    from worker.queue import job_state

    settings = esettings.model_copy(update={"decode_timeout_s": 2.0, "redis_url": redis_server.url, "job_retries": 1,
                                            "job_retry_backoff_s": "0"})  # retried at once, in one burst
    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule("delay", method="GET", path="longer-noise.avi$", delay_s=1.5))
        client = through(proxy)
        job_id = enqueue(BUCKET, LONGER, etag="", settings=settings, connection=redis)
        burst(redis, settings, runtime=WorkerRuntime(settings, moderator=Moderator(settings), s3_client=client))
    state = job_state(job_id, settings=settings, connection=redis)
    assert state.status == "finished" and state.result["error"]["code"] == "timeout", state
    assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).retries_left == 0  # retried once first
    assert stored(s3, settings, LONGER)[0]["error"]["code"] == "timeout"


def test_a_stalled_store_holds_the_enqueue_command_for_a_few_short_tries(s3, s3_server, redis_server, monkeypatch,
                                                                          capsys):
    """`deepfake enqueue` (and every command a person or an upload handler waits on) gives a stalled
    S3 endpoint CONTROL_ATTEMPTS reads of CONTROL_READ_TIMEOUT_S each, then queues the upload all the
    same with a warning; with the worker's 6 tries of 60 s it held the command for over 6 minutes first.
    The timeout is cut here so the test waits seconds, not the 40 s a user would."""
    import worker.s3
    from worker.cli import main

    monkeypatch.setattr(worker.s3, "CONTROL_READ_TIMEOUT_S", 0.5)
    with FaultProxy(s3_server.port) as proxy:
        stall = proxy.add(Rule("delay", method="HEAD", path="noise.avi$", delay_s=3.0))
        for name, value in (("DEEPFAKE_REDIS_URL", redis_server.url), ("DEEPFAKE_S3_ENDPOINT_URL", proxy.endpoint),
                            ("DEEPFAKE_ALLOWED_BUCKETS", BUCKET)):
            monkeypatch.setenv(name, value)
        assert main(["enqueue", f"s3://{BUCKET}/{BIG}"]) == 0
        out, err = capsys.readouterr()
        assert f"warning: s3://{BUCKET}/{BIG} could not be read here (Read timeout" in err, err
        assert len(out.split()) == 1  # the job id
        assert stall.hits == worker.s3.CONTROL_ATTEMPTS == 3
