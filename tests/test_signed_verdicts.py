"""Signed verdicts against the real S3 server: a planted verdict is not reused when a key is set."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import SecretStr

from worker.runtime import WorkerRuntime
from worker.s3 import S3Location
from worker.verdict_store import SIGNATURE_METADATA, VerdictStore, verify_verdict

BUCKET = "signed"
KEY = "clips/carphone.mp4"


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    return s3_server.bucket_with(BUCKET, {KEY: corpus["carphone"].read_bytes()})


def runtime(settings, s3_server, s3, moderator, tmp_path, secret: str | None) -> WorkerRuntime:
    s = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": BUCKET, "frames": 8,
                                    "verdict_prefix": f"v-{tmp_path.name}/",
                                    "verdict_secret": SecretStr(secret) if secret else None})
    return WorkerRuntime(s, moderator=moderator, s3_client=s3)


def stored(s3, rt: WorkerRuntime) -> tuple[bytes, dict, S3Location]:
    loc = rt.store.location_for(S3Location(BUCKET, KEY))
    obj = s3.get_object(Bucket=loc.bucket, Key=loc.key)
    return obj["Body"].read(), obj.get("Metadata") or {}, loc


def plant(s3, loc: S3Location, body: bytes, metadata: dict | None = None) -> None:
    s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=body, Metadata=metadata or {})


def test_a_planted_verdict_is_reused_without_a_key_and_replaced_with_one(settings, s3_server, s3, moderator,
                                                                         tmp_path):
    # without a key: the worker cannot tell its verdicts from planted ones (the threat)
    plain = runtime(settings, s3_server, s3, moderator, tmp_path / "plain", None)
    first = plain.moderate_s3(BUCKET, KEY)
    body, meta, loc = stored(s3, plain)
    assert SIGNATURE_METADATA not in meta
    forged = dict(json.loads(body), label="real" if first["label"] == "fake" else "fake", score=0.0)
    plant(s3, loc, json.dumps(forged).encode())
    assert plain.moderate_s3(BUCKET, KEY)["label"] == forged["label"]  # reused as is

    # with a key: verdicts are signed, and a planted one is recomputed and replaced
    signed = runtime(settings, s3_server, s3, moderator, tmp_path / "signed", "verdict-key")
    first = signed.moderate_s3(BUCKET, KEY)
    body, meta, loc = stored(s3, signed)
    assert verify_verdict("verdict-key", loc, body, meta[SIGNATURE_METADATA])
    assert not verify_verdict("other-key", loc, body, meta[SIGNATURE_METADATA])
    assert signed.moderate_s3(BUCKET, KEY)["created_at"] == first["created_at"]  # its own: reused

    forged = dict(json.loads(body), label="real" if first["label"] == "fake" else "fake", score=0.0)
    forged_body = json.dumps(forged).encode()
    for attempt in ({}, {SIGNATURE_METADATA: meta[SIGNATURE_METADATA]}, {SIGNATURE_METADATA: "v1=00"}):
        plant(s3, loc, forged_body, attempt)  # unsigned, an old signature on new bytes, a made-up one
        again = signed.moderate_s3(BUCKET, KEY)
        assert again["label"] == first["label"] and again["created_at"] != first["created_at"]  # recomputed
        body2, meta2, _ = stored(s3, signed)
        assert verify_verdict("verdict-key", loc, body2, meta2[SIGNATURE_METADATA])  # and replaced, signed
    # A signature with a non-ASCII character (botocore's client refuses to send one; other clients
    # do not): compare_digest raised TypeError, and every job on the upload failed instead.
    from botocore.handlers import validate_ascii_metadata

    planter = s3_server.client()
    planter.meta.events.unregister("before-parameter-build.s3.PutObject", validate_ascii_metadata)
    plant(planter, loc, forged_body, {SIGNATURE_METADATA: "v1=\u00e9"})
    assert not s3.head_object(Bucket=loc.bucket, Key=loc.key)["Metadata"][SIGNATURE_METADATA].isascii()
    again = signed.moderate_s3(BUCKET, KEY)
    assert again["label"] == first["label"] and again["created_at"] != first["created_at"]


def test_a_signed_verdict_does_not_verify_at_another_location(s3):
    store = VerdictStore(s3, prefix="sig-loc/", secret="verdict-key")
    a, b = S3Location(BUCKET, "a.mp4"), S3Location(BUCKET, "b.mp4")
    assert store.put(a, {"status": "ok", "label": "real"})
    obj = s3.get_object(Bucket=BUCKET, Key="sig-loc/a.mp4.json")
    body, sig = obj["Body"].read(), obj["Metadata"][SIGNATURE_METADATA]
    s3.put_object(Bucket=BUCKET, Key="sig-loc/b.mp4.json", Body=body, Metadata={SIGNATURE_METADATA: sig})
    assert store.get(a)[0] == {"status": "ok", "label": "real"}
    verdict, etag = store.get(b)  # copied beside another upload: not accepted there
    assert verdict is None and etag is not None


def test_a_result_naming_another_uploads_verdict_is_not_read_as_this_ones(s3):
    """A job result in Redis (anyone's to write) says where its verdict was stored: only a verdict path
    of that upload is read. `verdicts/xa.mp4.json` ends like `a.mp4.json`, and was read as a.mp4's,
    another upload's signed verdict shown as verified."""
    store = VerdictStore(s3, prefix="sig-at/", secret="verdict-key")
    a, xa = S3Location(BUCKET, "a.mp4"), S3Location(BUCKET, "xa.mp4")
    assert store.put(xa, {"status": "ok", "label": "real", "source": xa.uri})
    assert store.put(a, {"status": "ok", "label": "fake", "source": a.uri})
    theirs = store.location_for(xa)
    read = store.read(a, at=theirs)
    assert read["stored_at"] == store.location_for(a).uri and read["verdict"]["label"] == "fake"
    assert read["verified"] is True
    nested = S3Location(BUCKET, "other-prefix/deeper/a.mp4.json")  # another store's prefix: a.mp4's there
    assert VerdictStore.could_hold(a, nested) and not VerdictStore.could_hold(a, theirs)
    elsewhere = S3Location("verdicts", f"v/{BUCKET}/a.mp4.json")  # a verdict bucket's path for it
    assert VerdictStore.could_hold(a, elsewhere)
    assert not VerdictStore.could_hold(a, S3Location("verdicts", f"v/x{BUCKET}/a.mp4.json"))
    # That path may also be another upload's own (other/a.mp4's under this prefix): the body says whose.
    other = S3Location(BUCKET, "other/a.mp4")
    assert store.put(other, {"status": "ok", "label": "real", "source": other.uri})
    assert VerdictStore.could_hold(a, store.location_for(other))
    read = store.read(a, at=store.location_for(other))
    assert read["stored_at"] == store.location_for(a).uri and read["verdict"]["label"] == "fake"


def test_the_verdict_command_reads_and_checks_stored_verdicts(settings, s3_server, s3, moderator, tmp_path):
    signed = runtime(settings, s3_server, s3, moderator, tmp_path, "verdict-key")
    first = signed.moderate_s3(BUCKET, KEY)
    env = {**os.environ, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint, "DEEPFAKE_LOG_FORMAT": "json",
           "DEEPFAKE_VERDICT_PREFIX": signed.settings.verdict_prefix}

    def read(secret: str | None, *uris: str) -> tuple[int, list[dict], str]:
        proc = subprocess.run([sys.executable, "-m", "worker", "verdict", *uris], capture_output=True, text=True,
                              timeout=60, env={**env, **({"DEEPFAKE_VERDICT_SECRET": secret} if secret else {})})
        return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr

    rc, [found], _ = read("verdict-key", f"s3://{BUCKET}/{KEY}")
    assert rc == 0 and found["verified"] is True and found["verdict"]["created_at"] == first["created_at"]
    assert found["current"] is True  # it judged the bytes there now
    assert found["stored_at"] == f"s3://{BUCKET}/{signed.settings.verdict_prefix}{KEY}.json"
    rc, [unchecked], _ = read(None, f"s3://{BUCKET}/{KEY}")
    assert rc == 0 and unchecked["verified"] is None  # no key to check with
    body, meta, loc = stored(s3, signed)
    plant(s3, loc, json.dumps(dict(json.loads(body), label="forged")).encode(), meta)  # old signature, new bytes
    rc, [forged, missing], err = read("verdict-key", f"s3://{BUCKET}/{KEY}", f"s3://{BUCKET}/none.mp4")
    assert rc == 1 and forged["verified"] is False and forged["verdict"]["label"] == "forged"
    assert missing == {"upload": f"s3://{BUCKET}/none.mp4", "stored_at": None, "verified": None, "verdict": None,
                       "current": None}
    assert "stored_verdict_not_signed" in err  # the warning on stderr; stdout stays JSON Lines
    plant(s3, loc, b"[1, 2]", {})  # JSON, but no verdict: unsigned readers took it for one (exit 0)
    rc, [junk], _ = read(None, f"s3://{BUCKET}/{KEY}")
    assert rc == 1 and junk["verdict"] is None and junk["stored_at"] == found["stored_at"], junk


def test_an_old_signed_verdict_put_back_after_the_upload_changed_is_not_current(settings, s3_server, s3, moderator,
                                                                                tmp_path):
    """A signature binds a verdict to its location, not to the bytes there: someone who can write the
    verdict prefix puts back the signed verdict of the bytes before a replacement. It verifies; it
    was printed with exit 0 as the upload's verdict. Now `current` is false, and the exit 1."""
    signed = runtime(settings, s3_server, s3, moderator, tmp_path, "verdict-key")
    key = "clips/replaced.mp4"
    clip = s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=clip)
    signed.moderate_s3(BUCKET, key)
    loc = signed.store.location_for(S3Location(BUCKET, key))
    old = s3.get_object(Bucket=loc.bucket, Key=loc.key)
    old_body, old_meta = old["Body"].read(), old["Metadata"]
    s3.put_object(Bucket=BUCKET, Key=key, Body=clip + b"\0")  # the upload replaced
    signed.moderate_s3(BUCKET, key)  # and judged again
    plant(s3, loc, old_body, old_meta)  # the old signed verdict put back
    env = {**os.environ, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint, "DEEPFAKE_LOG_FORMAT": "json",
           "DEEPFAKE_VERDICT_PREFIX": signed.settings.verdict_prefix, "DEEPFAKE_VERDICT_SECRET": "verdict-key"}
    proc = subprocess.run([sys.executable, "-m", "worker", "verdict", f"s3://{BUCKET}/{key}",
                           f"s3://{BUCKET}/clips/gone.mp4"], capture_output=True, text=True, timeout=60, env=env)
    replayed, gone = (json.loads(line) for line in proc.stdout.splitlines())
    assert proc.returncode == 1 and replayed["verified"] is True and replayed["current"] is False, replayed
    assert gone["verdict"] is None and gone["current"] is None
