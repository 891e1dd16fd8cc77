"""Reviewer feedback beside verdicts, against the real S3 server: recorded with the verdict it judges,
an appeal replaces it, the summary counts reviewer labels by the worker's action, the worker never
moderates a feedback object, and `forget` erases it with the verdict."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from faultproxy import FaultProxy, Rule

from worker.engine.model_card import ModelCard
from worker.feedback import NoVerdict, record, summarize
from worker.forget import forget
from worker.pipeline import Moderator
from worker.runtime import WorkerRuntime

from worker.s3 import S3Location, make_client

BUCKET = "reviewed"
KEYS = {"block": "in/a.mp4", "review": "in/b.mp4", "allow": "in/c.mp4"}


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    clip = corpus["carphone"].read_bytes()
    return s3_server.bucket_with(BUCKET, {**{k: clip for k in KEYS.values()}, "in/notes.txt": b"not a video"})


def runtimes(settings, moderator, s3, s3_server, tmp_path) -> dict[str, WorkerRuntime]:
    """Three policies over the same weights: the random test model scores carphone ~0.51, so its
    own card blocks it, a card with threshold 0.6 and a band from 0.4 reviews it, one without allows it."""
    base = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": BUCKET,
                                       "frames": 4, "verdict_prefix": f"v-{tmp_path.name}/"})
    out = {"block": WorkerRuntime(base, moderator=moderator, s3_client=s3)}
    for action, review in (("review", 0.4), ("allow", None)):
        model_dir = tmp_path / action
        shutil.copytree(settings.model_dir, model_dir)
        card = ModelCard.load(model_dir).model_dump(by_alias=True)
        ModelCard.model_validate({**card, "threshold": 0.6, "review_threshold": review}).save(model_dir)
        s = base.model_copy(update={"model_dir": model_dir})
        out[action] = WorkerRuntime(s, moderator=Moderator(s, detector=moderator.detector), s3_client=s3)
    return out


def test_feedback_is_kept_beside_the_verdict_and_summarised_by_action(settings, moderator, s3, s3_server, tmp_path,
                                                                      redis):
    rts = runtimes(settings, moderator, s3, s3_server, tmp_path)
    for action, rt in rts.items():
        assert rt.moderate_s3(BUCKET, KEYS[action])["action"] == action
    s = rts["block"].settings
    first = record(BUCKET, KEYS["block"], "fake", reviewer="r-17", settings=s, s3_client=s3)
    assert first["verdict"]["action"] == "block" and first["verdict"]["model"]["name"] == "mdcsd-tiny-random"
    assert first["verdict"]["decision_score"] >= first["verdict"]["threshold"]
    record(BUCKET, KEYS["review"], "fake", settings=s, s3_client=s3)
    appeal = record(BUCKET, KEYS["review"], "real", note="appeal upheld", settings=s, s3_client=s3)
    assert appeal["verdict"]["review_threshold"] == 0.4
    record(BUCKET, KEYS["allow"], "fake", note="user report", settings=s, s3_client=s3)

    listed: list[int] = []
    summary = summarize(BUCKET, settings=s, s3_client=s3, on_listed=listed.append)
    assert summary["feedback"] == 3
    assert sum(listed) == 6  # the progress count: three verdicts and three feedback objects listed
    [model] = summary["models"]  # one set of weights, three policies
    assert model["by_action"] == {"block": {"fake": 1, "real": 0}, "review": {"fake": 0, "real": 1},
                                  "allow": {"fake": 1, "real": 0}}  # the appeal replaced the first decision
    assert (model["block_fake_share"], model["review_fake_share"], model["allow_fake_share"]) == (1.0, 0.0, 1.0)
    assert summarize(BUCKET, "in/a", settings=s, s3_client=s3)["feedback"] == 1  # a key prefix narrows it
    assert summarize(BUCKET, "elsewhere/", settings=s, s3_client=s3) == {
        "feedback": 0, "source": f"s3://{BUCKET}/elsewhere/", "models": [], "shadow_models": []}

    # the feedback object lies inside the verdict prefix: never moderated as an upload
    loc = rts["block"].store.feedback_location(S3Location(BUCKET, KEYS["block"]))
    assert rts["block"].moderate_s3(BUCKET, loc.key)["error"]["code"] == "access_denied"
    # forget takes the feedback with the verdict
    gone = forget(BUCKET, KEYS["block"], settings=s, connection=redis, s3_client=s3)
    assert f"s3://{BUCKET}/{loc.key}" in gone.s3_deleted
    assert summarize(BUCKET, settings=s, s3_client=s3)["feedback"] == 2


def test_feedback_needs_a_verdict_with_an_action(settings, moderator, s3, s3_server, tmp_path, corpus):
    rt = runtimes(settings, moderator, s3, s3_server, tmp_path)["block"]
    with pytest.raises(NoVerdict, match="no verdict stored"):
        record(BUCKET, KEYS["allow"], "real", settings=rt.settings, s3_client=s3)  # not scored yet
    assert rt.moderate_s3(BUCKET, "in/gone.mp4")["action"] is None  # not_found: nothing was decided
    with pytest.raises(NoVerdict, match=r"has no action to judge \(its status is error, not_found\)"):
        record(BUCKET, "in/gone.mp4", "real", settings=rt.settings, s3_client=s3)
    with pytest.raises(ValueError, match="label must be one of"):
        record(BUCKET, KEYS["block"], "maybe", settings=rt.settings, s3_client=s3)
    # A decision about the bytes there now, not about a verdict on bytes replaced since (it was
    # recorded, and summarised as the old action's): refused until the upload is scored again.
    s3.put_object(Bucket=BUCKET, Key="in/replaced.mp4", Body=corpus["carphone"].read_bytes())
    rt.moderate_s3(BUCKET, "in/replaced.mp4")
    s3.put_object(Bucket=BUCKET, Key="in/replaced.mp4", Body=corpus["carphone"].read_bytes() + b"\0")
    with pytest.raises(NoVerdict, match="judged other bytes than the upload's now"):
        record(BUCKET, "in/replaced.mp4", "fake", settings=rt.settings, s3_client=s3)
    rt.moderate_s3(BUCKET, "in/replaced.mp4")
    assert record(BUCKET, "in/replaced.mp4", "fake", settings=rt.settings, s3_client=s3)["label"] == "fake"
    # taken down since (a confirmed fake): its verdict is about the last bytes there were, and stands
    s3.delete_object(Bucket=BUCKET, Key="in/replaced.mp4")
    assert record(BUCKET, "in/replaced.mp4", "fake", settings=rt.settings, s3_client=s3)["label"] == "fake"
    s3.delete_object(Bucket=BUCKET, Key=rt.store.feedback_location(S3Location(BUCKET, "in/replaced.mp4")).key)

    # Unscored uploads with an action take feedback, counted apart: a damaged upload sent to
    # review and found fake twice, a text file allowed and reported, then found real.
    s3.put_object(Bucket=BUCKET, Key="in/cut-1.mp4", Body=corpus["damaged_tail_mp4"].read_bytes())
    s3.put_object(Bucket=BUCKET, Key="in/cut-2.mp4", Body=corpus["damaged_tail_mp4"].read_bytes())
    for key, label in (("in/cut-1.mp4", "fake"), ("in/cut-2.mp4", "fake"), ("in/notes.txt", "real")):
        rt.moderate_s3(BUCKET, key)
        fb = record(BUCKET, key, label, settings=rt.settings, s3_client=s3)
        assert fb["verdict"]["status"] == "error" and fb["verdict"]["score"] is None
    rt.moderate_s3(BUCKET, KEYS["block"])
    record(BUCKET, KEYS["block"], "fake", settings=rt.settings, s3_client=s3)
    [model] = summarize(BUCKET, settings=rt.settings, s3_client=s3)["models"]
    assert model["unscored"] == {"corrupt": {"review": {"fake": 2, "real": 0}},
                                 "not_a_video": {"allow": {"fake": 0, "real": 1}}}
    assert model["by_action"]["block"] == {"fake": 1, "real": 0} and model["block_fake_share"] == 1.0
    assert model["review_fake_share"] is None and model["n"] == 4  # the band's share is the scored reviews' only


def test_feedback_judges_the_shadow_model_too(settings, moderator, s3, s3_server, tmp_path):
    """With a candidate in shadow, each review also says how the candidate's action would have fared:
    here it would have allowed (its threshold 0.6) the upload production blocked and a reviewer found fake."""
    shadow_dir = tmp_path / "candidate"
    shutil.copytree(settings.model_dir, shadow_dir)
    card = ModelCard.load(shadow_dir).model_dump(by_alias=True)
    ModelCard.model_validate({**card, "name": "candidate", "threshold": 0.6}).save(shadow_dir)
    s = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": BUCKET, "frames": 4,
                                    "verdict_prefix": f"v-{tmp_path.name}/", "shadow_model_dir": shadow_dir})
    rt = WorkerRuntime(s, moderator=Moderator(s, detector=moderator.detector, engine=moderator.engine), s3_client=s3)
    v = rt.moderate_s3(BUCKET, KEYS["block"])
    assert (v["action"], v["shadow"]["action"]) == ("block", "allow")
    fb = record(BUCKET, KEYS["block"], "fake", settings=s, s3_client=s3)
    assert fb["shadow"]["action"] == "allow" and fb["shadow"]["model"]["name"] == "candidate"
    summary = summarize(BUCKET, settings=s, s3_client=s3)
    [production] = summary["models"]
    [shadow] = summary["shadow_models"]
    assert production["by_action"]["block"] == {"fake": 1, "real": 0}
    assert shadow["model"].startswith("candidate ") and shadow["by_action"]["allow"] == {"fake": 1, "real": 0}
    assert shadow["allow_fake_share"] == 1.0 and shadow["n"] == 1


def test_a_record_deleted_between_listing_and_reading_is_skipped(settings, moderator, s3, s3_server, tmp_path):
    """An erasure (`deepfake forget`) racing the summary: the listed feedback object is gone when its
    GET arrives (the loopback proxy deletes it on the real server first); the rest are counted."""
    rt = runtimes(settings, moderator, s3, s3_server, tmp_path)["block"]
    for key in (KEYS["block"], KEYS["allow"]):
        rt.moderate_s3(BUCKET, key)
        record(BUCKET, key, "fake", settings=rt.settings, s3_client=s3)

    def erase(req) -> None:
        s3.delete_object(Bucket=BUCKET, Key=req.path.split(f"/{BUCKET}/", 1)[1])

    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule(action="hook", method="GET", path=r"\.feedback\.json$", times=1, hook=erase))
        summary = summarize(BUCKET, settings=rt.settings, s3_client=make_client(proxy.endpoint))
    assert summary["feedback"] == 1 and len(proxy.requests("GET", path=r"\.feedback\.json$")) == 2


def test_the_commands(settings, moderator, s3, s3_server, tmp_path):
    rt = runtimes(settings, moderator, s3, s3_server, tmp_path)["block"]
    rt.moderate_s3(BUCKET, KEYS["block"])
    env = {**os.environ, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_VERDICT_PREFIX": rt.settings.verdict_prefix}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    done = cli("feedback", f"s3://{BUCKET}/{KEYS['block']}", "--label", "real", "--reviewer", "r-2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label"] == "real" and json.loads(done.stdout)["reviewer"] == "r-2"
    summary = cli("feedback-summary", f"s3://{BUCKET}")
    assert summary.returncode == 0 and json.loads(summary.stdout)["models"][0]["by_action"]["block"]["real"] == 1
    missing = cli("feedback", f"s3://{BUCKET}/{KEYS['review']}", "--label", "fake")
    assert missing.returncode == 1 and "no verdict stored" in missing.stderr
    assert cli("feedback", f"s3://{BUCKET}/{KEYS['block']}", "--label", "maybe").returncode == 2
