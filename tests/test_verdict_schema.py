"""The published verdict contract (worker/schemas/verdict.schema.json): every kind of verdict the worker
makes from real media, locally and through the queue worker against the real S3 server, is valid;
verdicts that break the README's rules are not. (tests/test_hostile.py checks its 55 cases too.)"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from verdict_schema import assert_valid_verdict, schema_errors

from worker.runtime import WorkerRuntime
from worker.s3 import S3Location
from worker.verdict import summary_of

BUCKET = "schema"


def test_every_verdict_from_the_corpus_is_valid(moderator, corpus, tmp_path):
    statuses = set()
    for name, path in sorted(corpus.items()):
        statuses.add(assert_valid_verdict(moderator.moderate_path(path))["status"])
    assert statuses == {"ok", "no_face", "error"}
    assert_valid_verdict(moderator.moderate_path(tmp_path / "missing.mp4"))
    reported = assert_valid_verdict(moderator.moderate_path(corpus["carphone"], report_dir=tmp_path / "report"))
    assert reported["report"].endswith("index.html")


def test_queue_verdicts_and_what_is_stored_are_valid(settings, moderator, corpus, s3_server, tmp_path):
    s3 = s3_server.bucket_with(BUCKET, {"ok.mp4": corpus["carphone"].read_bytes(),
                                        "none.mp4": corpus["no_face_mp4"].read_bytes(),
                                        "cut.mp4": corpus["damaged_tail_mp4"].read_bytes()})
    rt = WorkerRuntime(settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": BUCKET,
                                                   "frames": 4, "verdict_prefix": f"v-{tmp_path.name}/"}),
                       moderator=moderator, s3_client=s3)
    for key, status in (("ok.mp4", "ok"), ("none.mp4", "no_face"), ("cut.mp4", "error"), ("gone.mp4", "error")):
        v = assert_valid_verdict(rt.moderate_s3(BUCKET, key))
        assert_valid_verdict(summary_of(v))  # the job result
        assert v["status"] == status and "store" in v["timings_ms"] and v["stored_at"].startswith("s3://")
        assert_valid_verdict(rt.store.read(S3Location(BUCKET, key))["verdict"])
        if key != "gone.mp4":  # a missing upload has no bytes to describe
            assert v["input"]["key"] == key
            reused = assert_valid_verdict(rt.moderate_s3(BUCKET, key))
            assert reused["created_at"] == v["created_at"] and reused["stored_at"] == v["stored_at"]
    assert_valid_verdict(rt.moderate_s3("not-allowed", "x.mp4"))  # access_denied: no input block, nothing stored
    assert_valid_verdict(rt.moderate_s3(BUCKET, "../x.mp4"))
    assert_valid_verdict(rt.timeout_verdict(BUCKET, "ok.mp4", 392))


@pytest.fixture(scope="module")
def scored(moderator, corpus):
    return moderator.moderate_path(corpus["carphone"])


@pytest.mark.parametrize("change, complaint", [
    (lambda v: v.update(action="allow", label="fake"), "'block' was expected"),
    (lambda v: v.update(action=None), "None is not one of ['allow', 'review', 'block']"),
    (lambda v: v.update(error={"code": "corrupt", "message": "x"}), "is not of type 'null'"),
    (lambda v: v.update(surprise=1), "Additional properties are not allowed ('surprise'"),
    (lambda v: v.pop("action"), "'action' is a required property"),
    (lambda v: v.update(status="no_face", action=None), "None is not one of ['allow', 'review', 'block']"),
    (lambda v: v["faces"][0].update(box=[1, 2, 3]), "is too short"),
    (lambda v: v["model"].update(sha256="abc"), "does not match"),
    (lambda v: v.update(status="error", label=None, score=None, decision=None, tracks=[],
                        error={"code": "exploded", "message": "x"}), "'exploded' is not one of"),
    (lambda v: v.pop("faces"), "'faces' is a required property"),  # only a summary leaves them out
])
def test_verdicts_that_break_the_rules_are_invalid(scored, change, complaint):
    assert_valid_verdict(scored)
    broken = copy.deepcopy(scored)
    change(broken)
    errors = schema_errors(broken)
    assert any(complaint in e for e in errors), errors


@pytest.mark.parametrize("change, complaint", [
    (lambda s, v: s.update(faces=v["faces"]), "should not be valid under {'required': ['faces']}"),
    (lambda s, v: s.update(tracks=v["tracks"]), "'frames_seen' is a required property"),
    (lambda s, v: s.update(tracks=s["tracks"] * 9), "is too long"),
    (lambda s, v: s["detail"].update(level="full"), "'summary' was expected"),
    (lambda s, v: s["detail"].update(faces=0), "0 is less than the minimum of 1"),  # scored, so it had faces
])
def test_summaries_that_break_the_rules_are_invalid(scored, change, complaint):
    summary = assert_valid_verdict(summary_of(scored))
    change(summary, scored)
    errors = schema_errors(summary)
    assert any(complaint in e for e in errors), errors


def test_the_schema_is_packaged_documented_and_printed():
    from worker.verdict import SCHEMA, SCHEMA_PATH

    assert json.loads(SCHEMA_PATH.read_text())["title"] == SCHEMA
    readme = (SCHEMA_PATH.parents[2] / "README.md").read_text()
    assert "worker/schemas/verdict.schema.json" in readme and "deepfake schema" in readme
    printed = subprocess.run([sys.executable, "-m", "worker", "schema"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and json.loads(printed.stdout) == json.loads(SCHEMA_PATH.read_text())
