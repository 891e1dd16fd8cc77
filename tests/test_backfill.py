"""`deepfake backfill` against a real S3 server and a real redis-server: what is listed and queued,
what is skipped, the throttle that keeps live uploads from waiting behind the backlog, and resuming."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from workers import burst

from worker.backfill import backfill, parse_prefix
from worker.queue import enqueue, get_queue, job_state
from worker.settings import Settings

BUCKET = "backlog"
CLIPS = ["2026/11/a.mp4", "2026/11/b.mp4", "2026/11/c.webm", "2026/12/d.mp4", "2026/12/e.mp4"]
# a folder marker, a verdict, a key with a control character (the worker refuses it), and one whose
# verdict path would pass S3's 1024-byte key limit
NOT_UPLOADS = {"2026/11/": b"", "2026/verdicts/2026/11/a.mp4.json": b"{}", "2026/11/ctl\x01.mp4": b"x",
               "2026/11/" + "/".join(["x" * 199] * 5): b"x"}


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    clip = corpus["carphone"].read_bytes()
    return s3_server.bucket_with(BUCKET, {**{k: clip for k in CLIPS}, **NOT_UPLOADS})


@pytest.fixture()
def bsettings(random_model_dir, redis_server, s3_server):
    return Settings(model_dir=random_model_dir, redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint,
                    allowed_buckets=BUCKET, frames=4, metrics_port=0, log_format="json",
                    verdict_prefix="2026/verdicts/")


def queued(redis, settings) -> list[tuple[str, str]]:
    """(bucket, key) of each waiting job, in queue order."""
    return [tuple(job.args) for job in get_queue(redis, settings.queue).get_jobs()]


def listed_keys(s3, prefix: str) -> list[str]:
    """The keys under `prefix` in the store's own listing order (SeaweedFS walks folders)."""
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]


def test_every_upload_under_the_prefix_is_queued_once(s3, redis, bsettings):
    seen: list[tuple[str, str]] = []
    stats = backfill(BUCKET, "2026/", settings=bsettings, connection=redis, s3_client=s3,
                     on_enqueued=lambda key, job_id: seen.append((key, job_id)))
    assert [k for k, _ in seen] == CLIPS and queued(redis, bsettings) == [(BUCKET, k) for k in CLIPS]
    assert stats.enqueued == 5 and stats.duplicates == 0 and stats.listed == 9
    assert stats.last_key == listed_keys(s3, "2026/")[-1]  # the last handled, a skipped verdict here
    assert stats.skipped == {"folder": 1, "verdict": 1, "invalid_key": 1, "unstorable_key": 1} and stats.waited_s == 0
    # a rerun (or a key queued by hand before) is answered by the jobs already there: nothing new is queued
    assert enqueue(BUCKET, CLIPS[0], settings=bsettings, connection=redis, s3_client=s3) == seen[0][1]
    again: list[str] = []
    rerun = backfill(BUCKET, "2026/", settings=bsettings, connection=redis, s3_client=s3,
                     on_enqueued=lambda key, job_id: again.append(job_id))
    assert again == [job_id for _, job_id in seen] and get_queue(redis, bsettings.queue).count == 5
    assert rerun.enqueued == 0 and rerun.duplicates == 5  # was counted as 5 enqueued


def test_limit_and_start_after_resume_where_a_run_stopped(s3, redis, bsettings):
    first = backfill(BUCKET, "2026/", limit=2, settings=bsettings, connection=redis, s3_client=s3)
    assert first.enqueued == 2 and first.last_key == CLIPS[1] and first.stopped == "limit"
    # --limit counts new jobs: the same command again goes on past the two already queued (it used to
    # count them, and a batch of such runs never got past the first two)
    second = backfill(BUCKET, "2026/", limit=2, settings=bsettings, connection=redis, s3_client=s3)
    assert second.enqueued == 2 and second.duplicates == 2 and second.last_key == CLIPS[3]
    rest = backfill(BUCKET, "2026/", start_after=second.last_key, settings=bsettings, connection=redis, s3_client=s3)
    assert rest.enqueued == 1 and rest.stopped is None and queued(redis, bsettings) == [(BUCKET, k) for k in CLIPS]
    # a resumed run that handles nothing keeps the key it was given (it said null, and the next run
    # started over)
    last = listed_keys(s3, "2026/")[-1]
    assert backfill(BUCKET, "2026/", start_after=last, settings=bsettings, connection=redis,
                    s3_client=s3).last_key == last
    december = backfill(BUCKET, "2026/12/", settings=bsettings, connection=redis, s3_client=s3)
    assert december.listed == 2  # the prefix is honoured (and these two were queued already: same jobs)


def test_since_skips_older_uploads(s3_server, redis, bsettings, corpus):
    client = s3_server.bucket_with("backlog-since", {"old.mp4": corpus["carphone"].read_bytes()})
    time.sleep(1.1)  # S3 keeps LastModified to the second
    cut = dt.datetime.now(dt.timezone.utc)
    client.put_object(Bucket="backlog-since", Key="new.mp4", Body=corpus["carphone"].read_bytes())
    stats = backfill("backlog-since", since=cut.replace(microsecond=0), settings=bsettings, connection=redis,
                     s3_client=client)
    assert stats.enqueued == 1 and stats.skipped == {"older": 1}
    assert stats.last_key == [o["Key"] for o in client.list_objects_v2(Bucket="backlog-since")["Contents"]][-1]


@pytest.mark.timeout(300)
def test_the_throttle_keeps_the_queue_short_while_workers_drain_it(s3, redis, bsettings, moderator):
    longest, done = [0], threading.Event()
    result = {}

    def run() -> None:
        result["stats"] = backfill(BUCKET, "2026/", max_queued=2, settings=bsettings, connection=redis,
                                   s3_client=s3, sleep=lambda s: time.sleep(0.05))
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while not done.is_set() and time.monotonic() < deadline:
        longest[0] = max(longest[0], get_queue(redis, bsettings.queue).count)
        if get_queue(redis, bsettings.queue).count >= 2:
            # backfill waits for room meanwhile (it may also have just finished: stats.waited_s shows the wait)
            burst(redis, bsettings, moderator)  # a worker drains what is there
        time.sleep(0.02)
    thread.join(10)
    burst(redis, bsettings, moderator)
    stats = result["stats"]
    assert stats.enqueued == 5 and stats.waited_s > 0 and longest[0] <= 2
    registry_ids = get_queue(redis, bsettings.queue).finished_job_registry.get_job_ids()
    assert len(registry_ids) == 5
    verdicts = [job_state(i, settings=bsettings, connection=redis).result for i in registry_ids]
    assert sorted(v["input"]["key"] for v in verdicts) == CLIPS and {v["status"] for v in verdicts} == {"ok"}


def test_parse_prefix():
    assert parse_prefix("s3://backlog") == ("backlog", "") and parse_prefix("s3://backlog/2026/") == ("backlog", "2026/")
    for bad in ("backlog/2026", "s3://-bad/x", "s3://x"):
        with pytest.raises(ValueError):
            parse_prefix(bad)


def test_the_command_prints_one_line_per_job_and_a_summary(s3, redis, redis_server, s3_server):
    env = {**os.environ, "DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_QUEUE": "cli-backfill", "DEEPFAKE_VERDICT_PREFIX": "2026/verdicts/"}

    def cli(*args, **extra):
        return subprocess.run([sys.executable, "-m", "worker", "backfill", *args], capture_output=True, text=True,
                              env={**env, **extra}, timeout=120)

    proc = cli(f"s3://{BUCKET}/2026/11/", "--max-queued", "0", DEEPFAKE_ALLOWED_BUCKETS=BUCKET)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["key"] for line in lines] == CLIPS[:3] and all(line["job_id"] for line in lines)
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["enqueued"] == 3 and summary["last_key"] == listed_keys(s3, "2026/11/")[-1]
    assert summary["stopped"] is None and "warning" not in proc.stderr
    warned = cli(f"s3://{BUCKET}/2026/12/", DEEPFAKE_ALLOWED_BUCKETS="")
    assert warned.returncode == 0 and "not in DEEPFAKE_ALLOWED_BUCKETS" in warned.stderr
    missing = cli("s3://no-such-bucket/x/", DEEPFAKE_ALLOWED_BUCKETS="*")
    assert missing.returncode == 1 and "cannot list s3://no-such-bucket/x/" in missing.stderr
    assert cli("backlog/2026").returncode == 2 and cli(f"s3://{BUCKET}", "--since", "yesterday").returncode == 2


def test_a_stopped_command_still_says_where_to_resume(s3, redis, redis_server, s3_server):
    """A pod evicted (SIGTERM) while the backfill waits for room: it exited 143 with nothing on
    stderr, and the Job's retry started over from the first key."""
    import signal

    env = {**os.environ, "DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_QUEUE": "cli-backfill-stop", "DEEPFAKE_VERDICT_PREFIX": "2026/verdicts/",
           "DEEPFAKE_ALLOWED_BUCKETS": BUCKET, "DEEPFAKE_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "worker", "backfill", f"s3://{BUCKET}/2026/11/", "--max-queued", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())  # queued; the next waits for a worker that never comes
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    summary = json.loads(err.strip().splitlines()[-1])
    assert proc.returncode == 143 and out == "", (proc.returncode, err[-2000:])
    assert summary["stopped"] == "terminated" and summary["enqueued"] == 1 and summary["last_key"] == first["key"]
    assert summary["waited_s"] >= 1
