"""Face tracks on real multi-face footage, the track decision rule, and early exit."""
from __future__ import annotations

import numpy as np
import pytest

from media import carphone_frames, encode
from worker.pipeline import Moderator
from worker.tracks import build_tracks, decide_by_tracks, summarize, track_score


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

    def run(margin):
        m = Moderator(settings.model_copy(update={"early_exit_frames": 8, "early_exit_margin": margin}),
                      detector=moderator.detector, engine=moderator.engine)
        return m.moderate_path(corpus["carphone"])

    decisive = run(min(largest) - base["threshold"])  # every frame is at least this far above the threshold
    assert decisive["video"]["early_exit"] is True and decisive["video"]["frames_sampled"] == 8
    assert decisive["label"] == base["label"]
    undecided = run(0.1)
    assert undecided["video"]["early_exit"] is False and undecided["video"]["frames_sampled"] == 32
