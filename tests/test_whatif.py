"""`deepfake what-if`: a stored verdict decided again from its tracks' frame scores gives exactly what
the worker gives, under its own policy and under another; over a prefix on the real S3 server it
counts the actions now and then, the moves, and the reviewer labels on each."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import pytest

from worker.decision import DecisionPolicy
from worker.engine.model_card import ModelCard
from worker.feedback import record, summarize
from worker.pipeline import Moderator
from worker.runtime import WorkerRuntime
from worker.whatif import what_if

BUCKET = "whatif"


def carded(src, dst, **fields):
    shutil.copytree(src, dst)
    card = ModelCard.load(dst)
    ModelCard.model_validate({**card.model_dump(by_alias=True), **fields}).save(dst)
    return dst


@pytest.mark.parametrize("name", ["carphone", "h264_mp4", "vp9_webm", "rotated_mp4", "mjpeg_avi"])
def test_a_stored_verdict_decided_again_under_its_own_policy_is_unchanged(moderator, corpus, name):
    v = moderator.moderate_path(corpus[name])
    assert v["status"] == "ok" and v["tracks"], name
    assert moderator.policy.redecide(v) == (v["label"], v["action"], v["decision"]["score"])
    for rule in ("tracks", "mean"):
        for track_score in ("mean", "confident"):
            policy = DecisionPolicy(threshold=0.5, rule=rule, track_score=track_score)
            label, action, decision = policy.decide(json.loads(json.dumps(v["faces"])), v["score"])
            stored = {**v, "tracks": decision["tracks"]}
            assert policy.redecide(stored) == (label, action, decision["score"]), (name, rule, track_score)


def test_another_policy_decided_from_the_stored_verdict_is_what_the_worker_gives(settings, moderator, corpus,
                                                                                 random_model_dir, tmp_path):
    stored = moderator.moderate_path(corpus["carphone"])
    top = stored["decision"]["score"]
    changes = {"threshold": round(top + 0.05, 6), "review_threshold": round(top - 0.05, 6)}
    card_dir = carded(random_model_dir, tmp_path / "banded", **changes)
    fresh = Moderator(settings.model_copy(update={"model_dir": card_dir}),  # its own engine: the card's thresholds
                      detector=moderator.detector).moderate_path(corpus["carphone"])
    again = DecisionPolicy.from_key(stored["decision"]["policy"], **changes).redecide(stored)
    assert again == (fresh["label"], fresh["action"], fresh["decision"]["score"]) == ("real", "review", top)
    mean = DecisionPolicy.from_key(stored["decision"]["policy"], **changes, rule="mean", min_track_frames=99)
    assert mean.redecide(stored)[2] == stored["score"]  # no track long enough, or the paper's rule: the video score


def test_what_if_over_a_prefix_counts_actions_moves_and_reviews(settings, moderator, corpus, s3_server, tmp_path):
    clip = corpus["carphone"].read_bytes()
    s3 = s3_server.bucket_with(BUCKET, {"in/a.mp4": clip, "in/b.mp4": clip, "in/c.mp4": corpus["no_face_mp4"].read_bytes(),
                                        "in/d.mp4": corpus["damaged_tail_mp4"].read_bytes()})
    s = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": BUCKET, "frames": 8,
                                    "verdict_prefix": f"v-{tmp_path.name}/"})
    rt = WorkerRuntime(s, moderator=moderator, s3_client=s3)
    verdicts = {key: rt.moderate_s3(BUCKET, f"in/{key}") for key in ("a.mp4", "b.mp4", "c.mp4", "d.mp4")}
    assert [v["action"] for v in verdicts.values()] == ["block", "block", "allow", "review"]
    record(BUCKET, "in/a.mp4", "fake", settings=s, s3_client=s3)  # a reviewer confirmed the first block
    top = verdicts["a.mp4"]["decision"]["score"]
    changes = {"threshold": round(top + 0.05, 6), "review_threshold": round(top - 0.05, 6)}

    listed: list[int] = []
    result = what_if(BUCKET, "in/", changes, settings=s, s3_client=s3, on_listed=listed.append)
    [model] = result["models"]
    assert result["skipped"] == 2 and model["scored"] == 2 and sum(listed) == 5  # 4 verdicts + 1 feedback
    assert model["actions"] == {"current": {"allow": 0, "review": 0, "block": 2},
                                "proposed": {"allow": 0, "review": 2, "block": 0}}
    assert model["moves"] == {"block→review": 2}
    assert model["reviewed"]["current"]["block"] == {"fake": 1, "real": 0}
    assert model["reviewed"]["proposed"]["review"] == {"fake": 1, "real": 0}  # the fake would still reach a person

    now = dt.datetime.now(dt.timezone.utc)
    recent = what_if(BUCKET, "in/", changes, settings=s, s3_client=s3, since=now - dt.timedelta(hours=1))
    assert recent["models"][0]["moves"] == {"block→review": 2}
    assert what_if(BUCKET, "in/", changes, settings=s, s3_client=s3, since=now + dt.timedelta(hours=1))["models"] == []
    assert summarize(BUCKET, settings=s, s3_client=s3, since=now + dt.timedelta(hours=1))["feedback"] == 0
    assert summarize(BUCKET, settings=s, s3_client=s3, since=now - dt.timedelta(hours=1))["feedback"] == 1

    same = what_if(BUCKET, "in/", {"threshold": verdicts["a.mp4"]["threshold"]}, settings=s, s3_client=s3)
    assert same["models"][0]["moves"] == {}  # the policy they were made under: nothing moves
    assert same["models"][0]["reviewed"]["current"]["block"] == {"fake": 1, "real": 0}
    with pytest.raises(ValueError, match="above the model's threshold"):
        what_if(BUCKET, "in/", {"review_threshold": 0.99}, settings=s, s3_client=s3)

    # The upload is replaced (other bytes) and judged anew: the reviewer's label was on the old bytes.
    s3.put_object(Bucket=BUCKET, Key="in/a.mp4", Body=clip + b"\0" * 16)
    assert rt.moderate_s3(BUCKET, "in/a.mp4")["input"]["etag"] != verdicts["a.mp4"]["input"]["etag"]
    replaced = what_if(BUCKET, "in/", {"threshold": verdicts["a.mp4"]["threshold"]}, settings=s, s3_client=s3)
    assert replaced["models"][0]["reviewed"]["current"]["block"] == {"fake": 0, "real": 0}

    env = {**os.environ, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint, "DEEPFAKE_VERDICT_PREFIX": s.verdict_prefix}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "worker", "what-if", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    done = cli(f"s3://{BUCKET}/in/", "--threshold", str(changes["threshold"]), "--review-threshold",
               str(changes["review_threshold"]))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["moves"] == {"block→review": 2}
    no_band = cli(f"s3://{BUCKET}/in/", "--review-threshold", "none")
    assert no_band.returncode == 0 and json.loads(no_band.stdout)["changes"] == {"review_threshold": None}
    floorless = cli(f"s3://{BUCKET}/in/", "--mean-floor", "off")  # one face, one track: the mean is its score
    assert floorless.returncode == 0 and json.loads(floorless.stdout)["changes"] == {"mean_floor": False}
    assert json.loads(floorless.stdout)["models"][0]["moves"] == {}
    assert json.loads(cli(f"s3://{BUCKET}/in/", "--threshold", "0.9", "--since", "2999-01-01").stdout)["models"] == []
    assert cli(f"s3://{BUCKET}/in/").returncode == 2  # nothing to change
    bad = cli(f"s3://{BUCKET}/in/", "--review-threshold", "0.99")
    assert bad.returncode == 2 and "above the model's threshold" in bad.stderr
    assert cli(f"s3://{BUCKET}/in/", "--threshold", "1.5").returncode == 2
