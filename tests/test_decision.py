"""The decision policy: label and action (allow / review / block) from the scores of real footage."""
from __future__ import annotations

import shutil

import pytest
from pydantic import ValidationError

from worker import __version__
from worker.preprocess import PREPROCESSING_VERSION
from worker.decision import ALLOW, BLOCK, DEFAULT_ERROR_ACTIONS, REVIEW, DecisionPolicy, parse_error_actions
from worker.engine.model_card import ModelCard
from worker.errors import ErrorCode
from worker.pipeline import ConfigurationError, Moderator
from worker.runtime import WorkerRuntime
from worker.s3 import S3Location
from worker.settings import Settings
from worker.verdict import label_for
from worker.verdict_store import reusable


def carded(src, dst, **fields):
    """A copy of model directory `src` whose card has `fields` changed (same weights, same sha256)."""
    shutil.copytree(src, dst)
    card = ModelCard.load(dst)
    ModelCard.model_validate({**card.model_dump(by_alias=True), **fields}).save(dst)
    return dst


def test_actions_by_band():
    policy = DecisionPolicy(threshold=0.6, review_threshold=0.3)
    scores = (0.0, 0.299, 0.3, 0.599, 0.6, 1.0)
    assert [policy.action(label_for(s, 0.6), s) for s in scores] == [ALLOW, ALLOW, REVIEW, REVIEW, BLOCK, BLOCK]
    no_band = DecisionPolicy(threshold=0.6)
    assert [no_band.action(label_for(s, 0.6), s) for s in scores] == [ALLOW] * 4 + [BLOCK] * 2
    with pytest.raises(ValueError, match="above the model's threshold"):
        DecisionPolicy(threshold=0.5, review_threshold=0.6)


def test_label_and_action_follow_the_scores_the_verdict_publishes():
    """Scores are published to 6 decimals: within 1e-6 of a threshold, the label and action an
    integrator recomputes from the JSON must be the verdict's."""
    face = {"t": 0.0, "frame": 0, "box": [0, 0, 10, 10], "largest": True}
    for rule in ("mean", "tracks"):
        policy = DecisionPolicy(threshold=0.5, review_threshold=0.25, rule=rule, min_track_frames=1)
        faces = [{**face, "fake_score": 0.4999996, "track": 0}]
        label, action, decision = policy.decide(faces, mean_score=0.4999996)
        assert decision["score"] == 0.5 and label == label_for(decision["score"], 0.5) == "fake", rule
        assert action == BLOCK
        label, action, decision = policy.decide([{**face, "fake_score": 0.2499994, "track": 0}], mean_score=0.2499994)
        assert decision["score"] == 0.249999 and (label, action) == ("real", ALLOW), rule


def test_a_card_keeps_its_review_band_below_its_threshold(random_model_dir):
    card = ModelCard.load(random_model_dir).model_dump(by_alias=True)
    assert ModelCard.model_validate({**card, "threshold": 0.7, "review_threshold": 0.7}).review_threshold == 0.7
    with pytest.raises(ValidationError, match="review_threshold 0.8 is above threshold 0.7"):
        ModelCard.model_validate({**card, "threshold": 0.7, "review_threshold": 0.8})


def test_a_long_real_track_never_outweighs_the_largest_face(monkeypatch):
    """A moving camera breaks the largest face's track into pieces of 2 sampled frames, too short to
    count, each scored 0.95; a static bystander's one track scores 0.05. The top track used to decide
    (`allow`); the paper's video score, the largest face's mean, is now the least the score can be."""
    from test_tracks import face

    faces = []
    for f in range(16):
        x = 10 + 200 * (f // 2)  # a new place every 2 frames: a new track each time
        faces.append(face(f, (x, 10, x + 80, 100), 0.95, largest=True))
        faces.append(face(f, (40, 300, 70, 340), 0.05))  # the bystander, smaller, still
    mean = 0.95  # the paper's score: the largest face's frames
    label, action, decision = DecisionPolicy(threshold=0.5).decide(faces, mean)
    assert (label, action, decision["rule"], decision["score"]) == ("fake", BLOCK, "mean", 0.95)
    assert decision["policy"]["mean_floor"] is True
    before = DecisionPolicy(threshold=0.5, mean_floor=False)  # 0.4.0's rule
    assert before.decide(faces, mean)[:2] == ("real", ALLOW)
    # A verdict stored before the field existed is replayed (`deepfake what-if`) under the rule it had.
    stored = {"score": mean, "tracks": decision["tracks"]}
    old_key = {k: v for k, v in before.key().items() if k != "mean_floor"}
    assert DecisionPolicy.names_a_policy(old_key) and DecisionPolicy.from_key(old_key).redecide(stored)[:2] == (
        "real", ALLOW)
    assert DecisionPolicy.from_key(old_key, mean_floor=True).redecide(stored)[:2] == ("fake", BLOCK)


def test_early_exit_stays_clear_of_the_review_band():
    band = DecisionPolicy(threshold=0.5, review_threshold=0.3)
    no_band = DecisionPolicy(threshold=0.5)
    low = [0.35] * 8  # 0.15 below the threshold, but inside the band
    assert no_band.decisive(low, frames=8, margin=0.1) and not band.decisive(low, frames=8, margin=0.1)
    assert band.decisive([0.15] * 8, frames=8, margin=0.1)
    assert band.decisive([0.65] * 8, frames=8, margin=0.1) and not band.decisive([0.55] * 8, frames=8, margin=0.1)
    assert not band.decisive([0.15] * 7, frames=8, margin=0.1)  # too few frames yet


def test_the_review_band_on_real_footage(settings, moderator, corpus, random_model_dir, tmp_path):
    base = moderator.moderate_path(corpus["carphone"])
    score = base["decision"]["score"]  # the highest long-enough track's: the one the label came from
    # The seeded random test model scores carphone a little above its 0.5 threshold.
    assert (base["label"], base["action"]) == ("fake", BLOCK) and base["decision"]["rule"] == "tracks"
    assert score == base["decision"]["track_score_max"] and base["decision"]["review_threshold"] is None

    # A card whose threshold lies above this clip's score and whose review band holds it.
    banded = carded(random_model_dir, tmp_path / "banded", threshold=round(score + 0.05, 6),
                    review_threshold=round(score - 0.05, 6), review_operating_point={"target_fpr": 0.05})
    m = Moderator(settings.model_copy(update={"model_dir": banded}), detector=moderator.detector)
    v = m.moderate_path(corpus["carphone"])
    assert (v["label"], v["action"]) == ("real", REVIEW)
    assert v["decision"]["score"] == score and v["decision"]["review_operating_point"] == {"target_fpr": 0.05}
    assert v["decision"]["policy"] == {"rule": "tracks", "threshold": round(score + 0.05, 6),
                                       "review_threshold": round(score - 0.05, 6), "track_score": "mean",
                                       "min_track_frames": 3, "mean_floor": True}
    assert [f["fake_score"] for f in v["faces"]] == [f["fake_score"] for f in base["faces"]]

    # DEEPFAKE_REVIEW_THRESHOLD takes the card's place: above the score, the clip is allowed.
    above = Moderator(settings.model_copy(update={"model_dir": banded, "review_threshold": round(score + 0.01, 6)}),
                      detector=moderator.detector, engine=m.engine)
    v = above.moderate_path(corpus["carphone"])
    assert (v["label"], v["action"]) == ("real", ALLOW)
    assert v["decision"]["review_operating_point"] == {"source": "DEEPFAKE_REVIEW_THRESHOLD"}

    # The paper's rule compares the video score (mean of the largest face's frame scores) instead.
    mean = Moderator(settings.model_copy(update={"model_dir": banded, "decision": "mean"}),
                     detector=moderator.detector, engine=m.engine).moderate_path(corpus["carphone"])
    assert mean["decision"]["score"] == mean["score"] and "track_score_max" not in mean["decision"]
    assert mean["action"] == (REVIEW if mean["score"] >= score - 0.05 else ALLOW)

    with pytest.raises(ConfigurationError, match="DEEPFAKE_REVIEW_THRESHOLD: review threshold 0.9 is above"):
        Moderator(settings.model_copy(update={"model_dir": banded, "review_threshold": 0.9}),
                  detector=moderator.detector, engine=m.engine)


def test_no_face_is_allowed_and_an_error_gets_its_codes_action(settings, moderator, corpus):
    assert moderator.moderate_path(corpus["no_face_mp4"])["action"] == ALLOW
    bad = moderator.moderate_path(corpus["damaged_tail_mp4"])  # a player's decoder may show the rest: a person looks
    assert (bad["status"], bad["error"]["code"], bad["action"]) == ("error", "corrupt", REVIEW)
    assert moderator.moderate_path(corpus["audio_only_mp4"])["action"] == ALLOW  # no video to show
    assert moderator.moderate_path(corpus["carphone"].parent / "missing.mp4")["action"] is None  # nothing to act on
    for configured, action in (("corrupt=block", BLOCK), ("corrupt=none", None), ("too_long=allow", REVIEW)):
        m = Moderator(settings.model_copy(update={"error_actions": configured}), detector=moderator.detector,
                      engine=moderator.engine)
        assert m.moderate_path(corpus["damaged_tail_mp4"])["action"] == action, configured


def test_no_face_can_go_to_review_where_every_upload_should_show_one(settings, moderator, corpus):
    """An identity check or a selfie flow expects a face: there, a video without one is suspect."""
    m = Moderator(settings.model_copy(update={"no_face_action": REVIEW}), detector=moderator.detector,
                  engine=moderator.engine)
    v = m.moderate_path(corpus["no_face_mp4"])
    assert (v["status"], v["action"]) == ("no_face", REVIEW)
    assert m.policy.answers(v) and not moderator.policy.answers(v)  # reused only under the same setting
    assert m.policy.published()["no_face_action"] == REVIEW != moderator.policy.published()["no_face_action"]
    with pytest.raises(ValidationError, match="no_face_action"):
        Settings(no_face_action="none")


def test_every_error_code_has_a_default_action_and_the_setting_is_checked():
    assert set(DEFAULT_ERROR_ACTIONS) == {code.value for code in ErrorCode}
    assert parse_error_actions(" corrupt = block , internal=none,") == {**DEFAULT_ERROR_ACTIONS, "corrupt": BLOCK,
                                                                        "internal": None}
    for bad in ("corupt=block", "corrupt=ban", "corrupt", "=review"):
        with pytest.raises(ValidationError, match="is not code=action with code one of not_found"):
            Settings(error_actions=bad)


def test_a_stored_verdict_is_reused_only_under_the_policy_that_made_it():
    policy, banded = DecisionPolicy(threshold=0.5), DecisionPolicy(threshold=0.5, review_threshold=0.3)
    scored = {"status": "ok", "action": "allow", "error": None, "input": {"etag": "e", "frames": 8},
              "model": {"sha256": "m"}, "decision": {"policy": policy.key()}, "worker_version": __version__,
              "preprocessing_version": PREPROCESSING_VERSION}
    same = {"etag": "e", "model_sha256": "m", "frames": 8}
    assert reusable(scored, **same, policy=policy) and not reusable(scored, **same, policy=banded)
    assert not reusable({**scored, "decision": {"threshold": 0.5}}, **same, policy=policy)  # before policies
    # A model's NaN was called real and allowed before 0.4.2 (now an internal error): no answer.
    assert reusable({**scored, "score": 0.3, "faces": [{"fake_score": 0.3}], "tracks": [{"score": 0.3}]}, **same,
                    policy=policy)
    for nan in ({"score": float("nan")}, {"score": 0.3, "faces": [{"fake_score": float("nan")}, {"fake_score": 0.3}]},
                {"score": 0.3, "tracks": [{"score": float("inf")}]}):
        assert not reusable({**scored, **nan}, **same, policy=policy), nan
    no_face = {**scored, "status": "no_face", "decision": None}
    assert reusable(no_face, **same, policy=banded)  # nothing was decided: any policy allows it
    assert not reusable({k: v for k, v in no_face.items() if k != "action"}, **same, policy=policy)  # before actions
    corrupt = {**no_face, "status": "error", "action": REVIEW, "error": {"code": "corrupt", "message": "cut"},
               "worker_version": __version__}
    assert reusable(corrupt, **same, policy=banded)  # the score's policy does not decide an error's action
    # Another version's decoder may read it (0.2.0 scores files cut short that 0.1.0 called corrupt).
    assert not reusable({**corrupt, "worker_version": "0.1.0"}, **same, policy=policy)
    too_long = {**corrupt, "error": {"code": "too_long", "message": "x"}}
    assert reusable({**too_long, "worker_version": "0.1.0", "error": {"code": "too_large", "message": "x"}}, **same,
                    policy=policy)  # the size S3 states, not the decoder's reading
    assert reusable(too_long, **same, policy=policy)
    # A duration is the decoder's reading: 0.4.0 took a short video under a long Matroska soundtrack for too long.
    assert not reusable({**too_long, "worker_version": "0.4.0"}, **same, policy=policy)
    # 0.3.0 sees faces 0.2.0 could not (anamorphic pixels, a claimed 0.001 fps...): its allows are no answer.
    unversioned = {k: v for k, v in no_face.items() if k != "worker_version"}
    # 0.4.1 reads uploads labelled image/gif, and samples joined MPEG-TS segments to the end: 0.4.0's no_face
    # or not_a_video is no answer either.
    not_a_video = {**corrupt, "action": ALLOW, "error": {"code": "not_a_video", "message": "x"}}
    assert reusable(not_a_video, **same, policy=policy)
    for old in ({**scored, "worker_version": "0.2.0"}, {**no_face, "worker_version": "0.2.0"}, unversioned,
                {**no_face, "worker_version": "0.4.0"}, {**not_a_video, "worker_version": "0.4.0"}):
        assert not reusable(old, **same, policy=banded if old["status"] == "no_face" else policy)
    # 0.4.4 calls a picture in an image format not_a_video (0.4.3 scored a one-frame GIF) and refuses
    # strips shown over 256:1: earlier verdicts for those (the video block says) are no answer, others are.
    gif, strip = {"container": "gif", "width": 176, "height": 144}, {"container": "mov,mp4", "width": 4000, "height": 2}
    clip = {"container": "mov,mp4", "width": 176, "height": 144}
    for video, answers in ((gif, False), (strip, False), (clip, True), ({"container": "xwd_pipe"}, False)):
        for stored in ({**scored, "worker_version": "0.4.3", "video": video},
                       {**no_face, "worker_version": "0.4.3", "video": video}):
            assert reusable(stored, **same, policy=banded if stored["status"] == "no_face" else policy) is answers
    assert reusable({**scored, "video": gif}, **same, policy=policy)  # this version's decoding made it
    # Frames read or faces cut otherwise (version 1 read HDR uploads as SDR: dark, faces missed): no answer,
    # nor is a verdict written before verdicts carried the version; a limit's still is.
    unprocessed = {k: v for k, v in scored.items() if k != "preprocessing_version"}
    for old in (unprocessed, {**scored, "preprocessing_version": PREPROCESSING_VERSION - 1},
                {**no_face, "preprocessing_version": 1}, {**scored, "preprocessing_version": "2"}):
        assert not reusable(old, **same, policy=banded if old["status"] == "no_face" else policy)
    assert reusable({k: v for k, v in too_long.items() if k != "preprocessing_version"}, **same, policy=policy)
    blocking = DecisionPolicy(threshold=0.5, error_actions=parse_error_actions("corrupt=block"))
    assert not reusable(corrupt, **same, policy=blocking) and reusable({**corrupt, "action": BLOCK}, **same, policy=blocking)
    assert not reusable({**corrupt, "action": None}, **same, policy=policy)  # written before errors had actions
    # Sampled with another gap (or, written before the setting, with none): reused where both gaps give
    # the same frames (8 frames of 30 s lie 3.75 s apart, within 5 s), sampled anew where they do not.
    short, long = ({**scored, "video": {"duration_s": d}} for d in (30.0, 60.0))
    assert reusable(short, **same, max_sample_gap_s=5.0, policy=policy)
    assert not reusable(long, **same, max_sample_gap_s=5.0, policy=policy)  # 12 frames with a 5 s gap
    assert not reusable(scored, **same, max_sample_gap_s=5.0, policy=policy)  # no duration to tell by
    assert not reusable({**short, "video": {"duration_s": 30.0, "declared_duration_s": 1.0}}, **same,
                        max_sample_gap_s=5.0, policy=policy)  # sampled past a declared end
    gapped = {**long, "input": {**scored["input"], "max_sample_gap_s": 5.0}}
    assert reusable(gapped, **same, max_sample_gap_s=5.0, policy=policy) and not reusable(gapped, **same, policy=policy)
    assert reusable({**corrupt, "action": REVIEW}, **same, max_sample_gap_s=5.0, policy=policy)  # errors: any gap
    # Enqueuers match duplicates on the error actions too; a scored verdict records the scoring key only.
    assert blocking.key() == policy.key() and blocking.published() != policy.published()


def test_a_stored_error_verdict_is_decided_anew_under_other_error_actions(settings, moderator, corpus, s3_server,
                                                                          tmp_path):
    """Through the queue worker and the real S3 server: a damaged upload's corrupt verdict is stored
    with `review`, reused while the actions stay, and replaced once `corrupt=block` is configured."""
    s3 = s3_server.bucket_with("errors", {"cut.mp4": corpus["damaged_tail_mp4"].read_bytes()})
    base = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": "errors",
                                       "frames": 4, "verdict_prefix": f"v-{tmp_path.name}/"})
    default = WorkerRuntime(base, moderator=moderator, s3_client=s3)
    first = default.moderate_s3("errors", "cut.mp4")
    assert (first["error"]["code"], first["action"]) == ("corrupt", REVIEW)
    assert default.moderate_s3("errors", "cut.mp4")["created_at"] == first["created_at"]  # reused

    blocking = base.model_copy(update={"error_actions": "corrupt=block"})
    rt = WorkerRuntime(blocking, moderator=Moderator(blocking, detector=moderator.detector, engine=moderator.engine),
                       s3_client=s3)
    assert rt.published()["decision_policy"]["error_actions"]["corrupt"] == BLOCK
    again = rt.moderate_s3("errors", "cut.mp4")
    assert again["action"] == BLOCK and again["created_at"] != first["created_at"]
    assert rt.store.read(S3Location("errors", "cut.mp4"))["verdict"]["action"] == BLOCK  # the stored one was replaced
    # The missing upload: nothing to act on, whatever the setting for other codes.
    assert rt.moderate_s3("errors", "gone.mp4")["action"] is None
