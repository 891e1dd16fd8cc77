"""The whole pipeline on real video: every verdict field, and a typed error verdict for each bad file."""
from __future__ import annotations

import json

import pytest

from worker.errors import ErrorCode
from worker.pipeline import ConfigurationError, Moderator, resolve_model_dir
from worker.verdict import SCHEMA

VERDICT_KEYS = {"schema", "source", "status", "label", "action", "score", "threshold", "error", "video", "faces",
                "decision", "model", "timings_ms"}
VIDEO_KEYS = {"duration_s", "fps", "width", "height", "codec", "frames_sampled"}
MODEL_KEYS = {"name", "version", "sha256", "backend"}


def test_carphone_verdict_has_every_field(moderator, corpus):
    v = moderator.moderate_path(corpus["carphone"])
    json.dumps(v)  # plain JSON
    assert VERDICT_KEYS <= v.keys() and v["schema"] == SCHEMA
    assert v["status"] == "ok" and v["error"] is None
    assert v["label"] in ("fake", "real") and 0.0 <= v["score"] <= 1.0
    assert v["label"] == ("fake" if v["score"] >= v["threshold"] else "real")
    assert v["action"] == {"fake": "block", "real": "allow"}[v["label"]]  # no review band on this card
    assert VIDEO_KEYS <= v["video"].keys()
    assert v["video"]["frames_sampled"] == 32 and v["video"]["codec"] == "h264"
    assert v["video"]["frames_with_face"] >= 0.95 * 32
    assert MODEL_KEYS <= v["model"].keys() and len(v["model"]["sha256"]) == 64
    # The test model is random: the verdict must say so.
    assert v["model"]["trained"] is False and "randomly initialised" in v["model"]["warning"]
    scored = [f for f in v["faces"] if f["largest"]]
    assert len(scored) == v["video"]["frames_with_face"]
    for f in v["faces"]:
        x1, y1, x2, y2 = f["box"]
        assert 0 <= f["t"] <= 4.1 and f["detector_score"] >= 0.6
        assert -5 <= x1 < x2 <= 181 and -5 <= y1 < y2 <= 149
    assert v["score"] == pytest.approx(sum(f["fake_score"] for f in scored) / len(scored), abs=1e-5)
    assert {"open", "decode", "detect", "crop", "model", "total"} <= v["timings_ms"].keys()


@pytest.mark.parametrize("name", ["h264_mp4", "vp9_webm", "mjpeg_avi", "rotated_mp4", "odd_size_mp4"])
def test_real_faces_in_other_codecs(moderator, corpus, name):
    v = moderator.moderate_path(corpus[name])
    assert v["status"] == "ok", v["error"]
    assert v["video"]["frames_with_face"] >= 0.9 * v["video"]["frames_sampled"]


def test_rotated_video_reports_upright_geometry(moderator, corpus):
    v = moderator.moderate_path(corpus["rotated_mp4"])
    assert (v["video"]["width"], v["video"]["height"], v["video"]["rotation"]) == (176, 144, 90)
    assert v["video"]["frames_with_face"] == v["video"]["frames_sampled"]  # the faces are upright again
    for f in v["faces"]:
        assert f["box"][2] <= 181 and f["box"][3] <= 149


def test_video_without_a_face(moderator, corpus):
    v = moderator.moderate_path(corpus["no_face_mp4"])
    assert v["status"] == "no_face" and v["label"] is None and v["score"] is None and v["faces"] == []
    assert v["video"]["frames_sampled"] == 24


def test_a_face_after_a_damaged_packet_is_scored(moderator, corpus):
    """The face comes after a packet of garbage that made PyAV's decode loop stop (and the verdict
    `no_face`): it is found and scored, and the verdict counts the skipped packet."""
    v = moderator.moderate_path(corpus["faces_after_damage_mp4"])
    assert v["status"] == "ok", v["error"]
    assert v["video"]["decode_errors"] == 1 and v["video"]["frames_with_face"] >= 2
    assert v["faces"] and all(f["t"] >= 12.0 for f in v["faces"])


def test_a_spliced_in_face_is_scored_with_the_sampling_gap(settings, moderator, corpus):
    """A face shown for 2 s of a 40 s clip, between the samples of 8 evenly spread frames: with no gap
    the verdict is `no_face` (allowed); with samples at most 0.5 s apart it is found and scored."""
    def verdict(gap):
        m = Moderator(settings.model_copy(update={"frames": 8, "max_sample_gap_s": gap}), detector=moderator.detector,
                      engine=moderator.engine)
        return m.moderate_path(corpus["spliced_face_mp4"])

    assert verdict(0.0)["status"] == "no_face"
    v = verdict(0.5)
    assert v["status"] == "ok" and v["video"]["frames_sampled"] == 80 and v["video"]["frames_with_face"] >= 3
    assert all(10.0 <= f["t"] < 12.0 for f in v["faces"])
    assert settings.max_sample_gap_s == 5.0  # on by default


def test_a_face_past_an_understated_duration_is_scored(moderator, corpus):
    """A header that says 1 s of an 8 s video hid its last 7 s (the face) from the samples: `no_face`."""
    v = moderator.moderate_path(corpus["understated_duration_mkv"])
    assert v["status"] == "ok", v["error"]
    assert (v["video"]["duration_s"], v["video"]["declared_duration_s"]) == (8.0, 1.0)
    assert v["faces"] and all(f["t"] >= 5.0 for f in v["faces"])


def test_a_face_shown_in_b_frames_only_is_scored_by_default(moderator, corpus):
    """Scenery in the reference frames, the face in the B-frames between (7/8 of what plays): the
    default fast sampling decoded reference frames only and said `no_face`."""
    v = moderator.moderate_path(corpus["face_in_b_frames_mp4"])
    assert moderator.settings.sampling == "fast" and v["video"]["sampling"] == "fast"
    assert v["status"] == "ok" and v["video"]["frames_with_face"] >= 24


def _demo_and_fakes(moderator) -> tuple[Moderator, list]:
    """The packaged demo model, and the carphone frames self-blended (the demo model's kind of fake)."""
    import numpy as np
    from media import carphone_frames

    from training.data.sbi import self_blend
    from worker.pipeline import DEFAULT_MODEL_DIR
    from worker.settings import Settings

    demo = Moderator(Settings(model_dir=DEFAULT_MODEL_DIR, log_format="json"), detector=moderator.detector)
    rng = np.random.default_rng(5)
    source = carphone_frames()
    fakes = [self_blend(frame, max(found, key=lambda f: f.area), rng)[0]
             for frame, found in zip(source, moderator.detector.detect(np.stack(source)))]
    return demo, fakes


def test_a_deepfake_cut_short_is_scored_on_what_plays_and_blocked(moderator, tmp_path):
    """Cutting a deepfake short made it `corrupt` (review, or whatever DEEPFAKE_ERROR_ACTIONS says), while
    players still show it up to the cut. A self-blended carphone clip (the packaged demo model's kind of
    fake), 8 s at 30 fps, cut at half its bytes, is now sampled over the 3.7 s that play, and blocked."""
    from media import encode, truncate
    from verdict_schema import assert_valid_verdict

    demo, fakes = _demo_and_fakes(moderator)
    whole = encode(tmp_path / "fake.mp4", fakes + fakes[::-1], rate=30, container_options={"movflags": "+faststart"})
    v = assert_valid_verdict(demo.moderate_path(truncate(whole, tmp_path / "cut.mp4", 0.5)))
    assert (v["status"], v["label"], v["action"]) == ("ok", "fake", "block"), (v["status"], v["error"], v["score"])
    video = v["video"]
    assert video["truncated"] and video["declared_duration_s"] == 8.0 and 3.0 < video["duration_s"] < 4.5
    assert video["frames_sampled"] >= 28 and max(f["t"] for f in v["faces"]) > 3.0  # spread over what plays


def test_a_deepfake_frame_held_on_screen_is_sampled_while_it_shows_and_blocked(moderator, tmp_path):
    """A variable-rate file can show one frame for seconds. 4 s of the real carphone face at 30 fps, then
    one self-blended (fake) frame held for 12 s, then 0.5 s of the real face: each sample time took the
    first frame at or after it, so the held fake was never sampled (samples jumped from 3.8 s to the
    real frame at 16 s) and the video was allowed. Each sample time now takes the frame on screen then."""
    from fractions import Fraction

    from media import carphone_frames, encode
    from verdict_schema import assert_valid_verdict

    demo, fakes = _demo_and_fakes(moderator)
    real = carphone_frames()
    frames = real[:120] + [fakes[60]] + real[:15]
    ms = [33 * i for i in range(121)] + [33 * 120 + 12000 + 33 * i for i in range(15)]
    v = assert_valid_verdict(demo.moderate_path(encode(tmp_path / "held.mp4", frames, rate=30, pts=ms,
                                                       time_base=Fraction(1, 1000))))
    assert (v["status"], v["label"], v["action"]) == ("ok", "fake", "block"), (v["score"], v["decision"])
    held = [f for f in v["faces"] if 3.97 < f["t"] < 15.96]  # sample times while the held frame shows
    assert len(held) >= 20 and v["video"]["frames_sampled"] == 32
    assert min(f["fake_score"] for f in held) == max(f["fake_score"] for f in held)  # one frame, scored alike


@pytest.mark.parametrize(
    "name,code",
    [
        ("damaged_tail_mp4", "corrupt"),
        ("truncated_moov_end_mp4", "corrupt"),
        ("zero_bytes_mp4", "not_a_video"),
        ("text_mp4", "not_a_video"),
        ("png_mp4", "not_a_video"),
        ("audio_only_mp4", "no_video_stream"),
    ],
)
def test_bad_files_get_error_verdicts(moderator, corpus, name, code):
    v = moderator.moderate_path(corpus[name])
    assert v["status"] == "error" and v["label"] is None and v["score"] is None
    assert v["error"]["code"] == code and v["error"]["message"]
    assert v["error"]["code"] in {c.value for c in ErrorCode}
    assert v["model"]["name"] == "mdcsd-tiny-random"


def test_missing_file(moderator, tmp_path):
    v = moderator.moderate_path(tmp_path / "nope.mp4")
    assert v["status"] == "error" and v["error"]["code"] == "not_found"


def test_limits_give_typed_verdicts(settings, corpus, moderator):
    small = settings.model_copy(update={"max_bytes": 1000})
    m = Moderator(small, detector=moderator.detector, engine=moderator.engine)
    assert m.moderate_path(corpus["carphone"])["error"]["code"] == "too_large"
    short = settings.model_copy(update={"max_duration_s": 1.0})
    m = Moderator(short, detector=moderator.detector, engine=moderator.engine)
    v = m.moderate_path(corpus["carphone"])
    assert v["error"]["code"] == "too_long"


def test_a_model_whose_scores_are_not_probabilities_gives_an_internal_error_not_a_label(settings, moderator,
                                                                                       corpus, nan_model_dir):
    """A NaN is never above the threshold: a model whose weights went bad (or whose fp16 logits
    overflowed) had every face called real and the upload allowed, with `NaN` in the JSON."""
    m = Moderator(settings.model_copy(update={"model_dir": nan_model_dir, "engine": "pytorch"}),
                  detector=moderator.detector)
    v = m.moderate_path(corpus["carphone"])
    assert v["status"] == "error" and v["label"] is None and v["score"] is None
    assert v["error"]["code"] == "internal" and "outside [0, 1]" in v["error"]["message"], v["error"]
    assert v["action"] == m.policy.error_action("internal") and v["action"] != "allow"
    json.dumps(v, allow_nan=False)  # what strict JSON readers take


def test_missing_model_directory_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError):
        resolve_model_dir(tmp_path)


def test_overlapped_pipeline_gives_the_same_verdict(settings, moderator, corpus):
    overlapped = Moderator(settings.model_copy(update={"overlap": "on", "detect_batch": 4}),
                           detector=moderator.detector, engine=moderator.engine)
    assert overlapped.overlap and not moderator.overlap
    a = moderator.moderate_path(corpus["carphone"])
    b = overlapped.moderate_path(corpus["carphone"])
    assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert [f["box"] for f in a["faces"]] == [f["box"] for f in b["faces"]]
    for bad in ("damaged_tail_mp4", "audio_only_mp4"):  # errors raised in the producer thread still type
        assert overlapped.moderate_path(corpus[bad])["error"]["code"] == moderator.moderate_path(corpus[bad])["error"]["code"]


def test_crops_are_scored_a_batch_at_a_time_not_held_for_the_whole_video(settings, moderator, corpus, monkeypatch):
    """Without overlap or early exit (the CPU defaults) every crop of the video used to wait to be
    scored at the end, in one stack: a job asking for 1024 frames of a crowd held GBs of crops."""
    sizes: list[int] = []
    real_predict = moderator.engine.predict
    monkeypatch.setattr(moderator.engine, "predict", lambda crops: sizes.append(len(crops)) or real_predict(crops))
    held = Moderator(settings.model_copy(update={"batch_size": 4, "detect_batch": 2, "frames": 24}),
                     detector=moderator.detector, engine=moderator.engine)
    assert not held.overlap and held.settings.early_exit_frames == 0
    a = held.moderate_path(corpus["carphone"])
    assert len(sizes) > 1 and max(sizes) <= 4 + 2  # a batch, and one chunk's crops past it
    assert sum(sizes) == sum(f["fake_score"] is not None for f in a["faces"]) == 24
    sizes.clear()
    whole = Moderator(settings.model_copy(update={"batch_size": 64, "detect_batch": 2, "frames": 24}),
                      detector=moderator.detector, engine=moderator.engine).moderate_path(corpus["carphone"])
    assert sizes == [24] and a["score"] == pytest.approx(whole["score"], abs=1e-5)


def test_prefetch_stops_its_producer_when_the_consumer_stops():
    import itertools

    from worker.prefetch import prefetch

    produced = []
    endless = (produced.append(i) or i for i in itertools.count())
    for i in prefetch(endless, depth=2):
        if i == 5:
            break
    assert 6 <= len(produced) <= 9  # bounded read-ahead, then the thread exits


def test_decoder_threads_follow_the_cpu_quota_and_do_not_change_the_verdict(settings, moderator, corpus):
    from worker.cpus import available_cpus

    assert moderator.decode_threads == available_cpus()  # not FFmpeg's count of the host's cores
    single = Moderator(settings.model_copy(update={"decode_threads": 1}), detector=moderator.detector,
                       engine=moderator.engine)
    assert single.decode_threads == 1
    for name in ("carphone", "vp9_webm"):
        a, b = moderator.moderate_path(corpus[name]), single.moderate_path(corpus[name])
        assert a["score"] == b["score"] and a["faces"] == b["faces"], name


def test_int8_engine_through_settings(settings, moderator, corpus, tmp_path):
    """DEEPFAKE_ENGINE=onnxruntime DEEPFAKE_PRECISION=int8 DEEPFAKE_INT8_CALIBRATION=...: the worker's path."""
    import numpy as np

    from worker.decode import Limits, VideoReader
    from worker.pipeline import DEFAULT_MODEL_DIR
    from worker.preprocess import crop_face

    fp32 = Moderator(settings.model_copy(update={"model_dir": DEFAULT_MODEL_DIR, "engine": "onnxruntime"}),
                     detector=moderator.detector)
    with VideoReader(str(corpus["carphone"]), Limits(60, 10**7, 60)) as reader:
        frames = [f.image for f in reader.sample(16)]
    faces = moderator.detector.detect(np.stack(frames))
    np.save(tmp_path / "calib.npy", np.stack([crop_face(f, fs[0].box, size=fp32.crop_size)
                                              for f, fs in zip(frames, faces) if fs]))
    s = settings.model_copy(update={"model_dir": DEFAULT_MODEL_DIR, "engine": "onnxruntime", "precision": "int8",
                                    "int8_calibration": tmp_path / "calib.npy", "cache_dir": tmp_path / "cache"})
    m = Moderator(s, detector=moderator.detector)
    v = m.moderate_path(corpus["carphone"])
    assert v["status"] == "ok" and v["model"]["backend"] == "onnxruntime-cpu-int8"
    assert v["model"]["int8_max_abs_diff"] is not None
    assert abs(v["score"] - fp32.moderate_path(corpus["carphone"])["score"]) < 0.06
