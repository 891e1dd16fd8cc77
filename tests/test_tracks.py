"""Face tracks on real multi-face footage, the track decision rule, and early exit."""
from __future__ import annotations

import json

import numpy as np
import pytest
from verdict_schema import assert_valid_verdict

from media import carphone_frames, encode
from worker.pipeline import Moderator
from worker.tracks import build_tracks, decide_by_tracks, summarize, track_score
from worker.verdict import summary_of


def face(frame, box, score=0.5, largest=False):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    marks = [[x1 + 0.3 * w, y1 + 0.4 * h], [x1 + 0.7 * w, y1 + 0.4 * h], [x1 + 0.5 * w, y1 + 0.6 * h],
             [x1 + 0.35 * w, y1 + 0.8 * h], [x1 + 0.65 * w, y1 + 0.8 * h]]
    return {"t": frame / 8, "frame": frame, "box": list(box), "landmarks": marks, "largest": largest,
            "fake_score": score, "detector_score": 0.99}


def test_two_faces_make_two_tracks_and_a_cut_starts_new_ones():
    faces = []
    for f in range(6):
        faces.append(face(f, (10 + f, 10, 60 + f, 70), 0.9, largest=True))
        faces.append(face(f, (200 - f, 20, 240 - f, 70), 0.1))
    for f in range(6, 9):  # a cut: the faces jump elsewhere
        faces.append(face(f, (120, 100, 170, 160), 0.2, largest=True))
    tracks = build_tracks(faces)
    assert [len(t.faces) for t in tracks] == [6, 6, 3]
    assert {f["track"] for f in faces[:12:2]} == {0} and {f["track"] for f in faces[1:12:2]} == {1}
    summaries = summarize(tracks, threshold=0.5, strategy="mean", min_frames=3)
    assert [t["fake"] for t in summaries] == [True, False, False]
    assert summaries[0]["start_t"] == 0.0 and summaries[0]["end_t"] == 5 / 8
    assert decide_by_tracks(summaries) == ("fake", pytest.approx(0.9))


def test_short_tracks_cannot_flag_and_gaps_are_bridged():
    faces = [face(0, (10, 10, 60, 70), 0.95, True), face(3, (12, 10, 62, 70), 0.95, True)]
    tracks = build_tracks(faces, max_gap=2)
    assert len(tracks) == 1  # two missing sampled frames bridged
    summaries = summarize(tracks, threshold=0.5, strategy="mean", min_frames=3)
    assert summaries[0]["fake"] is False and decide_by_tracks(summaries) == (None, None)
    assert len(build_tracks(faces, max_gap=1)) == 2


def test_confident_strategy():
    mostly_fake = [0.95] * 20 + [0.3] * 10
    assert track_score(mostly_fake, "confident") == pytest.approx(0.95)
    assert track_score(mostly_fake, "mean") == pytest.approx((0.95 * 20 + 3) / 30)
    clean = [0.05] * 28 + [0.6] * 2
    assert track_score(clean, "confident") == pytest.approx(0.05)
    with pytest.raises(ValueError):
        track_score([0.5], "median")


@pytest.fixture(scope="module")
def tiled_clip(tmp_path_factory):
    """The real carphone clip tiled 2×2: four faces in every frame."""
    frames = [np.concatenate([np.concatenate([f, f[:, ::-1]], axis=1), np.concatenate([f[:, ::-1], f], axis=1)])
              for f in carphone_frames()[::4]]
    return encode(tmp_path_factory.mktemp("tiled") / "tiled.mp4", frames, rate=8)


def test_multi_face_clip_gives_one_track_per_face(moderator, tiled_clip):
    v = moderator.moderate_path(tiled_clip)
    assert v["status"] == "ok"
    long_tracks = [t for t in v["tracks"] if len(t["frames"]) >= 0.9 * v["video"]["frames_sampled"]]
    assert len(long_tracks) == 4, [len(t["frames"]) for t in v["tracks"]]
    for t in long_tracks:
        assert t["start_t"] < 0.3 and t["end_t"] > 3.3  # each spans the clip
        xs = [b[0] for b in t["boxes"]]
        assert max(xs) - min(xs) < 60  # stays with its own face
        assert len(t["frame_scores"]) == len(t["frames"]) and t["score"] is not None
    quadrants = {(t["boxes"][0][0] > 176, t["boxes"][0][1] > 144) for t in long_tracks}
    assert len(quadrants) == 4
    assert v["decision"]["rule"] in ("tracks", "mean") and v["label"] in ("fake", "real")


def test_early_exit_stops_sampling_when_the_first_frames_are_decisive(settings, moderator, corpus):
    base = moderator.moderate_path(corpus["carphone"])
    largest = [f["fake_score"] for f in base["faces"] if f["largest"]]
    # The seeded random test model scores every carphone frame a little above 0.5.
    assert min(largest) > base["threshold"] and max(largest) < base["threshold"] + 0.05

    def run(margin, overlap="off"):
        m = Moderator(settings.model_copy(update={"early_exit_frames": 8, "early_exit_margin": margin,
                                                  "overlap": overlap}),
                      detector=moderator.detector, engine=moderator.engine)
        return m.moderate_path(corpus["carphone"])

    for overlap in ("off", "on"):  # on: a thread decodes and detects ahead of the scoring
        decisive = run(min(largest) - base["threshold"], overlap)  # every frame at least this far above
        assert decisive["status"] == "ok", decisive["error"]
        assert decisive["video"]["early_exit"] is True and decisive["video"]["frames_sampled"] == 8
        assert decisive["label"] == base["label"] and len(decisive["faces"]) == 8  # none decoded ahead
        assert all(f["fake_score"] is not None for f in decisive["faces"])
        undecided = run(0.1, overlap)
        assert undecided["video"]["early_exit"] is False and undecided["video"]["frames_sampled"] == 32


def test_a_failure_while_scoring_stops_the_decoding_thread_first(settings, moderator, corpus, monkeypatch):
    """With decoding overlapped, an error in the main thread ends in an `internal` verdict, and the
    decoding thread is joined before the video closes (freed under it, FFmpeg would crash the worker)."""
    import threading

    class Failing:  # the real engine, failing to score
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def predict(self, crops):
            raise RuntimeError("CUDA out of memory (as a GPU can)")

    from worker.decode import VideoReader

    decoding_at_close = []
    close = VideoReader.close

    def watched_close(reader):
        decoding_at_close.append([t.name for t in threading.enumerate() if t.name == "decode-detect"])
        close(reader)

    monkeypatch.setattr(VideoReader, "close", watched_close)
    m = Moderator(settings.model_copy(update={"overlap": "on"}), detector=moderator.detector,
                  engine=Failing(moderator.engine))
    v = m.moderate_path(corpus["carphone"])
    assert v["error"]["code"] == "internal" and "CUDA out of memory" in v["error"]["message"]
    assert decoding_at_close == [[]]  # the thread had ended when the video closed


@pytest.fixture(scope="module")
def grid_clip(tmp_path_factory):
    """The real carphone clip tiled 3×3, as a recorded video call's grid shows nine people."""
    frames = [np.ascontiguousarray(np.tile(f, (3, 3, 1))) for f in carphone_frames()[::8]]
    return encode(tmp_path_factory.mktemp("grid") / "grid.mp4", frames, rate=4)


def test_every_face_of_a_crowded_frame_gets_scored_frames(settings, moderator, grid_clip):
    """Nine faces, four scored per frame: the largest always, the others in turn, so every face's track
    can flag the video (scoring the four largest every time left five faces never scored)."""
    v = Moderator(settings.model_copy(update={"frames": 16}), detector=moderator.detector,
                  engine=moderator.engine).moderate_path(grid_clip)
    assert v["status"] == "ok"
    per_frame = {}
    for f in v["faces"]:
        per_frame.setdefault(f["frame"], []).append(f)
    assert all(len(fs) == 9 for fs in per_frame.values()) and len(per_frame) == 15
    for fs in per_frame.values():
        assert sum(f["fake_score"] is not None for f in fs) == 4
        assert next(f for f in fs if f["largest"])["fake_score"] is not None  # the paper's score reads it
    tracks = [t for t in v["tracks"] if len(t["frames"]) == 15]
    assert len(tracks) == 9, [len(t["frames"]) for t in v["tracks"]]
    scored = [len(t["frame_scores"]) for t in tracks]
    assert all(t["long_enough"] for t in tracks) and min(scored) >= 5, scored


def test_a_deepfaked_participant_in_a_crowded_grid_flags_the_video(moderator, tmp_path):
    """A 3×3 call grid whose smallest face (bottom right) is self-blended, the packaged demo model's
    kind of fake: it is never among the four largest, yet its track is scored, fake, and decides."""
    import cv2

    from training.data.sbi import self_blend
    from worker.pipeline import DEFAULT_MODEL_DIR
    from worker.settings import Settings

    demo = Moderator(Settings(model_dir=DEFAULT_MODEL_DIR, frames=16, log_format="json"), detector=moderator.detector)
    rng = np.random.default_rng(5)
    source = carphone_frames()[::8]
    frames = []
    for frame, found in zip(source, moderator.detector.detect(np.stack(source))):
        fake = self_blend(frame, max(found, key=lambda f: f.area), rng)[0]
        tile = np.full_like(frame, 40)
        tile[11:133, 13:163] = cv2.resize(fake, (150, 122), interpolation=cv2.INTER_AREA)  # a smaller face
        grid = np.tile(frame, (3, 3, 1))
        grid[288:, 352:] = tile
        frames.append(np.ascontiguousarray(grid))
    v = demo.moderate_path(encode(tmp_path / "call.mp4", frames, rate=4))
    assert v["status"] == "ok" and len(v["tracks"]) == 9
    corner = next(t for t in v["tracks"] if t["boxes"][0][0] > 352 and t["boxes"][0][1] > 288)
    assert all(not f["largest"] for f in v["faces"] if f["track"] == corner["id"])
    assert corner["long_enough"] and corner["fake"] and corner["score"] > 0.8
    assert not any(t["fake"] for t in v["tracks"] if t["id"] != corner["id"])  # the real faces stay real
    assert (v["label"], v["action"], v["decision"]["rule"]) == ("fake", "block", "tracks")
    assert v["score"] < v["threshold"]  # the paper's largest-face mean alone would have allowed it
    # A job result's summary lists 8 of the 9 tracks: the deciding one is never the one cut.
    summary = assert_valid_verdict(summary_of(v))
    assert [t["id"] for t in summary["tracks"]][:1] == [corner["id"]] and len(summary["tracks"]) == 8
    assert summary["detail"] == {"level": "summary", "faces": len(v["faces"]), "tracks": 9}
    assert summary["tracks"][0]["frames_scored"] == len(corner["frame_scores"]) >= 5
    assert len(json.dumps(summary)) < 4096 < len(json.dumps(v)) / 4, (len(json.dumps(summary)), len(json.dumps(v)))
