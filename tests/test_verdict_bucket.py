"""Where verdicts go. DEEPFAKE_VERDICT_BUCKET: one verdict bucket for several upload buckets, against
the real S3 server; uploads in different buckets may share a key, and each must keep its own verdict
(they used to share `<prefix><key>.json`, each replacing the other's). DEEPFAKE_VERDICT_PREFIX must
be a folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError
from servers import empty_bucket, ensure_bucket, free_ports

from worker.feedback import record, summarize
from worker.forget import forget
from worker.runtime import WorkerRuntime
from worker.settings import Settings
from worker.whatif import what_if

KEY = "clips/same-name.mp4"


def test_uploads_with_one_key_in_two_buckets_keep_their_own_verdicts(s3_server, corpus, settings, moderator, redis):
    s3 = s3_server.bucket_with("tenant-a", {KEY: corpus["carphone"].read_bytes()})
    s3_server.bucket_with("tenant-b", {KEY: corpus["vp9_webm"].read_bytes()})
    ensure_bucket(s3, "verdicts-central")
    empty_bucket(s3, "verdicts-central")  # none reused from an earlier run in this session
    s = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": "tenant-a,tenant-b",
                                    "verdict_bucket": "verdicts-central", "frames": 4, "upload_reports": True})
    rt = WorkerRuntime(s, moderator=moderator, s3_client=s3)
    a, b = rt.moderate_s3("tenant-a", KEY), rt.moderate_s3("tenant-b", KEY)
    assert a["stored_at"] == f"s3://verdicts-central/verdicts/tenant-a/{KEY}.json"
    assert b["stored_at"] == f"s3://verdicts-central/verdicts/tenant-b/{KEY}.json"
    assert a["report"].startswith(f"s3://verdicts-central/verdicts/tenant-a/{KEY}.report/")
    assert a["video"]["codec"] == "h264" and b["video"]["codec"] == "vp9"
    # each upload's verdict is reused for it, not recomputed (nor replaced by the other's)
    assert rt.moderate_s3("tenant-a", KEY)["created_at"] == a["created_at"]
    assert rt.moderate_s3("tenant-b", KEY)["created_at"] == b["created_at"]
    # readers of many verdicts find each bucket's own: the scan lists <prefix><bucket>/ in the verdict bucket
    record("tenant-a", KEY, "fake", settings=s, s3_client=s3)
    assert summarize("tenant-a", settings=s, s3_client=s3)["feedback"] == 1
    assert summarize("tenant-b", settings=s, s3_client=s3)["feedback"] == 0
    replay = what_if("tenant-a", "clips/", {"threshold": 0.99}, settings=s, s3_client=s3)
    assert replay["models"][0]["scored"] == 1 and replay["skipped"] == 0
    # erasing one upload leaves the other's verdict and report
    gone = forget("tenant-a", KEY, settings=s, connection=redis, s3_client=s3)
    assert gone.complete and all(u.startswith(f"s3://verdicts-central/verdicts/tenant-a/{KEY}") for u in gone.s3_deleted)
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="verdicts-central").get("Contents", [])]
    assert left and all(k.startswith(f"verdicts/tenant-b/{KEY}") for k in left)
    body = s3.get_object(Bucket="verdicts-central", Key=f"verdicts/tenant-b/{KEY}.json")["Body"].read()
    assert json.loads(body)["input"]["bucket"] == "tenant-b"


@pytest.mark.parametrize("prefix", ["", "verdicts", "/verdicts/", "a//b/", "a/../b/", "./"])
def test_the_verdict_prefix_must_be_a_folder(prefix):
    # "" would put every upload inside the prefix (all refused), "verdicts" every key starting with it
    with pytest.raises(ValidationError, match="must be a folder"):
        Settings(verdict_prefix=prefix)


def test_a_nested_verdict_prefix_is_accepted_and_a_bad_one_stops_the_cli(monkeypatch):
    assert Settings(verdict_prefix="moderation/verdicts/").verdict_prefix == "moderation/verdicts/"
    closed = f"redis://127.0.0.1:{free_ports(1)[0]}/0"  # nothing listens: never a real Redis, should it connect
    proc = subprocess.run([sys.executable, "-m", "worker", "status"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DEEPFAKE_VERDICT_PREFIX": "verdicts", "DEEPFAKE_REDIS_URL": closed})
    assert proc.returncode == 2 and "invalid setting: DEEPFAKE_VERDICT_PREFIX: " in proc.stderr and "must be a folder" in proc.stderr
    monkeypatch.setenv("DEEPFAKE_VERDICT_PREFIX", "")  # an empty variable is unset: the default folder
    assert Settings().verdict_prefix == "verdicts/"
