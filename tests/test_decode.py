"""Decoding real and generated videos: even sampling, rotation, limits and typed errors."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from media import carphone_frames, carphone_path, encode, encode_hdr
from worker.decode import Limits, VideoReader, looks_like_video_container, sample_times
from worker.video import MAX_SAMPLED_FRAMES, frames_to_sample
from worker.errors import ErrorCode, ModerationError

LIMITS = Limits(max_duration_s=1200, max_pixels=4096 * 2304, decode_timeout_s=60)


def sample(path, n, limits=LIMITS, mode="exact"):
    with VideoReader(str(path), limits) as reader:
        frames = list(reader.sample(n, mode=mode))
        return reader.info, frames


def test_sample_times_are_slice_centres():
    assert sample_times(0.0, 4.0, 4) == [0.5, 1.5, 2.5, 3.5]


def test_carphone_sampling_spreads_over_the_whole_clip(corpus):
    info, frames = sample(corpus["carphone"], 32)
    assert (info.codec, info.width, info.height) == ("h264", 176, 144)
    assert info.fps == pytest.approx(29.97, abs=0.01) and info.duration_s == pytest.approx(4.0, abs=0.05)
    assert info.frames_sampled == len(frames) == 32
    times = [f.t for f in frames]
    assert times == sorted(times) and len(set(times)) == 32
    assert times[0] < 0.2 and times[-1] > 3.7  # not the first 32 frames
    gaps = np.diff(times)
    assert gaps.max() < 2.5 * gaps.mean()
    originals = carphone_frames()
    k = round(times[10] * 29.97)
    assert np.abs(frames[10].image.astype(int) - originals[k]).mean() < 1.0  # the frame at that time


def test_more_samples_than_frames_gives_each_frame_once(corpus):
    info, frames = sample(corpus["carphone"], 500)
    assert len(frames) == info.frames_sampled == 120
    assert len({f.t for f in frames}) == 120


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_frame_rate_claiming_a_frame_every_1000_s_is_not_believed(tmp_path, mode):
    """Matroska's DefaultDuration said 0.001 fps while frames came every 40 ms: the first frame took every
    sample time within 500 s of it, and 8 samples of a 24 s video were one frame at 0 s."""
    from hostile_builders import Assets
    from hostile_display import b_frame_rate_claims_1000_s

    path = tmp_path / "slow_claim.mkv"
    b_frame_rate_claims_1000_s(path, Assets())
    info, frames = sample(path, 8, mode=mode)
    assert info.fps == pytest.approx(0.001)  # reported as declared
    times = [f.t for f in frames]
    assert len(frames) == 8 and len(set(times)) == 8, times
    for t, target in zip(times, sample_times(0.0, 24.0, 8)):
        assert abs(t - target) <= 1.5, (times, target)  # each near its slice centre (1 fps windows; held 11-17 s)


def test_anamorphic_pixels_are_stretched_as_players_show_them(tmp_path):
    from hostile_builders import Assets
    from hostile_display import b_anamorphic

    path = tmp_path / "anamorphic.mp4"
    b_anamorphic(path, Assets())
    info, frames = sample(path, 4)
    assert (info.width, info.height) == (174, 144) and frames[0].image.shape == (144, 174, 3)
    # Mild anamorphism is left as stored: the carphone clip's 128:117 pixels.
    info, frames = sample(carphone_path(), 2)
    assert (info.width, info.height) == (176, 144) and frames[0].image.shape == (144, 176, 3)


def test_the_first_frames_in_order_as_displayed(corpus):
    """Training's consecutive-frame extraction reads through the same reader (rotation included)."""
    with VideoReader(str(corpus["rotated_mp4"]), LIMITS) as reader:
        frames = list(reader.first(5))
    assert [f.index for f in frames] == [0, 1, 2, 3, 4] and frames[0].image.shape == (144, 176, 3)
    times = [f.t for f in frames]
    assert times == sorted(times) and len(set(times)) == 5


def test_rotation_metadata_is_honoured(corpus):
    info, frames = sample(corpus["rotated_mp4"], 4)
    assert info.rotation == 90 and (info.width, info.height) == (176, 144)  # stored as 144×176
    assert frames[0].image.shape == (144, 176, 3)
    # A +90° display matrix turns the stored frame 90° counter-clockwise, as FFmpeg's autorotate does.
    # Stored turned clockwise with a +90° display matrix: FFmpeg's autorotate turns it back
    # counter-clockwise, so the upright frame is the original carphone frame.
    original = carphone_frames()[::4][round(frames[0].t * 8)]  # encoded at 8 fps from every 4th frame
    upright = frames[0].image.astype(int)
    assert np.abs(upright - original).mean() < 4.0
    assert np.abs(upright - np.rot90(original, 2)).mean() > 20.0  # the other way round is clearly wrong


@pytest.mark.parametrize("transfer", ["hlg", "pq"])
def test_an_hdr_video_is_seen_as_its_sdr_picture(tmp_path, transfer):
    """A phone's HLG video, an HDR10 (PQ) file: read as if SDR, the picture is flat (PQ) or pale
    (BT.2020); the reader brings it to the SDR BT.709 picture a viewer's screen shows."""
    originals = carphone_frames()[::8]
    path = encode_hdr(tmp_path / f"{transfer}.mp4", originals, transfer)
    with VideoReader(str(path), LIMITS) as reader:
        frames = list(reader.first(len(originals)))
    assert len(frames) == len(originals)
    with av.open(str(path)) as container:  # what the reader would see without the conversion
        naive = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for frame, original, raw in zip(frames, originals, naive):
        seen, expected = frame.image.astype(int), original.astype(int)
        assert np.abs(seen - expected).mean() < 4.0, np.abs(seen - expected).mean()
        assert np.abs(raw.astype(int) - expected).mean() > 12.0  # what it used to be


def pq_code(nits: float) -> int:
    """SMPTE ST 2084's inverse EOTF: the limited-range 10-bit code of a PQ signal of `nits` cd/m²."""
    m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 32, 3424 / 4096, 2413 / 128, 2392 / 128
    y = (nits / 10000) ** m1
    return round(64 + 876 * ((c1 + c2 * y) / (1 + c3 * y)) ** m2)


def flat_frame(code: int, transfer, primaries=None, size: int = 16) -> av.VideoFrame:
    """A grey 10-bit frame (every luma sample `code`, chroma neutral), tagged with `transfer`."""
    from av.video.reformatter import ColorPrimaries, Colorspace

    frame = av.VideoFrame(size, size, "yuv420p10le")
    for plane, value in zip(frame.planes, (code, 512, 512)):
        np.frombuffer(plane, dtype=np.uint16)[:] = value
    frame.color_trc, frame.colorspace = transfer, Colorspace.BT2020
    frame.color_primaries = primaries or ColorPrimaries.BT2020
    return frame


def test_hdr_reference_levels_land_where_bt2408_puts_them():
    """Independent of swscale: HDR reference white (203 cd/m² in PQ, 75 % HLG) is SDR white, a
    quarter of it is a quarter of SDR white's light through BT.1886's 2.4 gamma, brighter clips."""
    from av.video.reformatter import ColorTrc

    from worker.frames import to_rgb

    def grey(frame):
        image = to_rgb(frame)
        assert np.ptp(image) <= 1 and np.ptp(image.reshape(-1, 3).mean(0)) <= 1.5  # grey stays grey
        return float(image.mean())

    assert grey(flat_frame(pq_code(0), ColorTrc.SMPTE2084)) <= 1
    assert grey(flat_frame(pq_code(203), ColorTrc.SMPTE2084)) >= 252
    assert abs(grey(flat_frame(pq_code(203 / 4), ColorTrc.SMPTE2084)) - 255 * 0.25 ** (1 / 2.4)) <= 3
    assert grey(flat_frame(pq_code(100), ColorTrc.SMPTE2084)) < 200  # 100 cd/m² is not white: 203 is
    assert grey(flat_frame(pq_code(1000), ColorTrc.SMPTE2084)) >= 254
    assert grey(flat_frame(round(64 + 876 * 0.75), ColorTrc.ARIB_STD_B67)) >= 252
    assert grey(flat_frame(64, ColorTrc.ARIB_STD_B67)) <= 1


def test_hdr_and_sdr_encodes_of_a_face_get_the_same_faces(tmp_path, moderator):
    """Read as SDR, the PQ file's darker, flatter face moved the detector's boxes by up to 4.2 px."""
    originals = carphone_frames()[::4]
    sdr = moderator.moderate_path(str(encode(tmp_path / "sdr.mp4", originals, rate=8, options={"crf": "4"})))
    hdr = moderator.moderate_path(str(encode_hdr(tmp_path / "pq.mp4", originals, "pq", rate=8)))
    assert sdr["status"] == hdr["status"] == "ok"
    assert hdr["video"]["frames_with_face"] == sdr["video"]["frames_with_face"] >= 0.9 * sdr["video"]["frames_sampled"]
    assert len(hdr["faces"]) == len(sdr["faces"])
    for a, b in zip(sdr["faces"], hdr["faces"]):
        assert np.abs(np.subtract(a["box"], b["box"])).max() <= 2.5, (a["box"], b["box"])  # 1.3 px at most here
    assert abs(hdr["score"] - sdr["score"]) < 0.02


@pytest.mark.parametrize("name", ["h264_mp4", "faststart_mp4", "vp9_webm", "mjpeg_avi", "odd_size_mp4"])
def test_codecs_and_containers_decode(corpus, name):
    info, frames = sample(corpus[name], 8)
    assert len(frames) == 8 and frames[0].image.dtype == np.uint8
    assert frames[0].image.shape == (info.height, info.width, 3)


@pytest.mark.parametrize(
    "name,code",
    [
        ("damaged_tail_mp4", ErrorCode.CORRUPT),
        ("truncated_moov_end_mp4", ErrorCode.CORRUPT),
        ("zero_bytes_mp4", ErrorCode.NOT_A_VIDEO),
        ("text_mp4", ErrorCode.NOT_A_VIDEO),
        ("png_mp4", ErrorCode.NOT_A_VIDEO),
        ("audio_only_mp4", ErrorCode.NO_VIDEO_STREAM),
    ],
)
def test_bad_files_raise_typed_errors(corpus, name, code):
    with pytest.raises(ModerationError) as err:
        sample(corpus[name], 8)
    assert err.value.code == code


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_a_file_cut_short_is_sampled_over_the_part_that_plays(corpus, mode):
    """Half the bytes of a faststart MP4: its index promises 3.75 s, its data ends at 1.6 s, and a player
    shows that much. It used to be `corrupt`; now the fast pass samples the part that plays over its own
    length (exact mode has sampled at the declared spacing as it decoded, so fewer)."""
    with VideoReader(str(corpus["truncated_mp4"]), LIMITS) as reader:
        frames = list(reader.sample(8, mode=mode))
        info = reader.info
    assert info.truncated and info.declared_duration_s == 3.75 and info.duration_s == pytest.approx(1.625)
    assert info.to_dict()["truncated"] is True and info.to_dict()["duration_s"] == 1.625
    times = [f.t for f in frames]
    assert times == sorted(set(times)) and times[-1] >= 1.0
    assert len(frames) >= (7 if mode == "fast" else 3), times


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_data_that_is_there_but_does_not_decode_is_corrupt_not_cut(corpus, mode):
    """Every packet from 1.5 s on is garbage, the file whole: the data reaches the declared end, so this
    is no cut file (a player's decoder may make more of it than FFmpeg does): corrupt, to review."""
    with pytest.raises(ModerationError, match="data reaching 3.75 s of a declared 3.75 s") as err, \
            VideoReader(str(corpus["damaged_tail_mp4"]), LIMITS) as reader:
        list(reader.sample(8, mode=mode))
    assert err.value.code == ErrorCode.CORRUPT


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_damaged_packet_does_not_hide_what_follows(corpus, mode):
    """One packet of garbage before the last second: PyAV's own decode loop stops there, having read
    over 75 % of the duration, so the face after it went unseen; the reader skips the packet, as players
    do, and samples to the end."""
    path = corpus["faces_after_damage_mp4"]
    seen = []
    with pytest.raises(av.error.InvalidDataError), av.open(str(path)) as container:
        for frame in container.decode(video=0):
            seen.append(frame.time)
    assert 0.75 * 13.0 < max(seen) < 12.0  # the file does what it is for
    with VideoReader(str(path), LIMITS) as reader:
        frames = list(reader.sample(40, mode=mode))
    assert reader.info.decode_errors == 1 and reader.info.to_dict()["decode_errors"] == 1
    assert len(frames) == reader.info.frames_sampled == 40
    tail = carphone_frames()[::4][7]  # the last frame: the face, not scenery
    assert frames[-1].t > 12.5 and np.abs(frames[-1].image.astype(int) - tail).mean() < 4.0


def test_a_second_video_stream_is_refused_not_ignored(tmp_path):
    """The face is in the second track: scoring the first alone would find none (and allow it)."""
    from hostile_builders import Assets
    from hostile_lies import b_two_video_streams

    path = tmp_path / "two.mp4"
    b_two_video_streams(path, Assets())
    with av.open(str(path)) as container:
        second = next(container.decode(video=1)).to_ndarray(format="rgb24")
    assert np.abs(second.astype(int) - carphone_frames()[0]).mean() < 4.0
    with pytest.raises(ModerationError) as err:
        sample(path, 4)
    assert err.value.code == ErrorCode.UNSUPPORTED and "2 video streams" in err.value.message


def test_long_videos_get_samples_at_most_the_gap_apart():
    assert frames_to_sample(60.0, 32, 5.0) == 32  # 1.9 s apart already
    assert frames_to_sample(1200.0, 32, 5.0) == 240 and frames_to_sample(1200.0, 32, 0.0) == 32
    assert frames_to_sample(10.0, 1, 5.0) == 2 and frames_to_sample(10.01, 1, 5.0) == 3
    assert frames_to_sample(3600.0, 32, 0.5) == MAX_SAMPLED_FRAMES


def test_a_spliced_in_face_between_samples_is_sampled_with_a_gap(corpus):
    """2 s of face at 10–12 s of a 40 s clip: 8 frames spread evenly miss it; samples at most 0.5 s
    apart (80 of them) land on it."""
    path = corpus["spliced_face_mp4"]
    with VideoReader(str(path), LIMITS) as reader:
        sparse = list(reader.sample(8))
    assert len(sparse) == 8 and not any(10.0 <= f.t < 12.0 for f in sparse)
    with VideoReader(str(path), LIMITS) as reader:
        dense = list(reader.sample(8, max_gap_s=0.5))
    assert len(dense) == reader.info.frames_sampled == 80 and max(np.diff([f.t for f in dense])) <= 0.5
    spliced = [f for f in dense if 10.0 <= f.t < 12.0]
    assert len(spliced) == 4
    assert np.abs(spliced[0].image.astype(int) - carphone_frames()[::4][round((spliced[0].t - 10.0) * 4)]).mean() < 4.0


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_frames_past_an_understated_duration_are_sampled(corpus, mode):
    """The header says 1 s, the data runs 8 s (the face from 5 s on): sampling goes on past the
    declared end, spaced as for a video ending at each frame, and the reported duration is what decoded."""
    path = corpus["understated_duration_mkv"]
    with av.open(str(path)) as container:
        assert container.duration / av.time_base == pytest.approx(1.0)  # what FFmpeg believes
        assert sum(1 for _ in container.decode(video=0)) == 64  # what a player shows
    with VideoReader(str(path), LIMITS) as reader:
        frames = list(reader.sample(8, mode=mode))
        info = reader.info
    assert (info.duration_s, info.declared_duration_s, info.sampling) == (8.0, 1.0, "exact")
    assert info.to_dict()["declared_duration_s"] == 1.0 and info.frames_sampled == len(frames)
    times = [f.t for f in frames]
    assert times == sorted(times) and len(set(times)) == len(times) and times[-1] >= 7.5
    assert sum(t >= 5.0 for t in times) >= 4  # the face
    # Past the declared end (and the 0.5 s allowed over it), spaced as an honest video as long as the
    # data so far: never wider than its own 1/8, give or take a frame (8 fps).
    spacing = [(gap, t) for gap, t in zip(np.diff(times), times[1:]) if t > 1.5]
    assert len(spacing) >= 10 and all(gap <= t / 8 + 0.125 + 1e-6 for gap, t in spacing)
    with VideoReader(str(corpus["carphone"]), LIMITS) as reader:  # an honest header adds nothing
        assert len(list(reader.sample(8))) == 8 and reader.info.declared_duration_s is None
        assert "declared_duration_s" not in reader.info.to_dict()


def test_fast_sampling_decodes_the_frames_shown_at_the_sample_times(corpus):
    """The face is in every B-frame only: sampling reference frames alone saw none of it. The fast
    pass decodes the frame at each sample time whatever its type, and picks what exact decoding picks."""
    path = corpus["face_in_b_frames_mp4"]
    with av.open(str(path)) as container:
        kinds = [av.video.frame.PictureType(frame.pict_type).name for frame in container.decode(video=0)]
    assert kinds.count("B") >= 255 and all(k != "B" for k in kinds[::8])  # the file is what it says
    picked = {}
    for mode in ("fast", "exact"):
        with VideoReader(str(path), LIMITS) as reader:
            picked[mode] = list(reader.sample(32, mode=mode))
            assert reader.info.sampling == mode  # fast did not fall back
    assert [f.t for f in picked["fast"]] == [f.t for f in picked["exact"]]
    on_b_frames = [f for f in picked["fast"] if round(f.t * 30) % 8]
    assert len(on_b_frames) >= 24
    originals = carphone_frames()
    for f in on_b_frames[:4]:
        i = round(f.t * 30)
        face = (originals + originals[::-1] + originals)[i]
        assert np.abs(f.image.astype(int) - face).mean() < 6.0


def test_clean_files_have_no_decode_errors(corpus):
    for name in ("carphone", "vp9_webm", "mjpeg_avi"):
        info, frames = sample(corpus[name], 8)
        assert info.decode_errors == 0 and len(frames) == 8


@pytest.mark.parametrize(
    "limits,code",
    [
        (Limits(max_duration_s=2.0, max_pixels=10**8, decode_timeout_s=60), ErrorCode.TOO_LONG),
        (Limits(max_duration_s=100, max_pixels=176 * 144 - 1, decode_timeout_s=60), ErrorCode.TOO_LARGE),
        (Limits(max_duration_s=100, max_pixels=10**8, decode_timeout_s=1e-6), ErrorCode.TIMEOUT),
    ],
)
def test_limits(corpus, limits, code):
    with pytest.raises(ModerationError) as err:
        sample(corpus["carphone"], 8, limits)
    assert err.value.code == code


def test_container_sniffing(corpus):
    assert looks_like_video_container(corpus["carphone"].read_bytes()[:512])
    assert looks_like_video_container(corpus["vp9_webm"].read_bytes()[:512])
    assert looks_like_video_container(corpus["mjpeg_avi"].read_bytes()[:512])
    assert not looks_like_video_container(corpus["text_mp4"].read_bytes()[:512])
    assert not looks_like_video_container(b"")


def test_fast_sampling_stays_even(tmp_path):
    from media import encode, scenery_frames

    clip = encode(tmp_path / "gop.mp4", scenery_frames(300, size=(72, 96)), rate=30)  # x264 defaults: B-frames
    with VideoReader(str(clip), LIMITS) as reader:
        fast = list(reader.sample(32, mode="fast"))
        assert reader.info.sampling == "fast"
    with VideoReader(str(clip), LIMITS) as reader:
        exact = list(reader.sample(32, mode="exact"))
    assert len(fast) == len(exact) == 32
    slice_s = 10.0 / 32
    for i, f in enumerate(fast):
        assert abs(f.t - (i + 0.5) * slice_s) <= slice_s / 2 + 1e-6  # inside its own slice
    assert len({f.t for f in fast}) == 32


def remux(src: Path, dst: Path, fmt: str) -> Path:
    """The same H.264 packets in another container (MPEG-TS: Annex B, 90 kHz timestamps)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        stream = inp.streams.video[0]
        into = out.add_stream_from_template(stream)
        annexb = av.BitStreamFilterContext("h264_mp4toannexb", stream) if fmt == "mpegts" else None
        for packet in inp.demux(stream):
            for p in (annexb.filter(packet) if annexb else [packet]) if packet.size else []:
                p.stream = into
                out.mux(p)
    return dst


@pytest.mark.parametrize("clip", ["scenery", "scenery_ts", "scenery_mkv", "carphone", "av1"])
def test_fast_sampling_decodes_the_same_pixels_as_exact(clip, corpus, tmp_path):
    """x264's defaults make B-frames that other B-frames refer to (a B-pyramid): skipping every B-frame
    but the sampled ones decoded sampled B-frames against missing references (13 levels off on
    average on the scenery clip, 3 on carphone's 10-frame slices). The fast pass decodes what is
    referred to, so each sampled frame is the exact pass's, pixel for pixel. AV1's decoder (libdav1d)
    reads skip_frame only when it opens: it skipped non-reference frames at sample times, and took a
    neighbour (5 levels off on carphone); it now decodes every frame."""
    from hostile_builders import AV1_ENCODERS, AV1_OPTIONS, has_encoder
    from media import carphone_frames, encode, scenery_frames

    if clip.startswith("scenery"):
        path = encode(tmp_path / "gop.mp4", scenery_frames(300, size=(72, 96)), rate=30)
        if clip != "scenery":
            path = remux(path, tmp_path / f"gop.{clip[8:]}", {"ts": "mpegts", "mkv": "matroska"}[clip[8:]])
    elif clip == "av1":
        codec = next((c for c in AV1_ENCODERS if has_encoder(c)), None)
        if codec is None:
            pytest.fail("this PyAV build has no AV1 encoder (pyproject pins one that has)")
        path = encode(tmp_path / "av1.mp4", carphone_frames()[:120], rate=30, codec=codec, options=AV1_OPTIONS[codec])
    else:
        path = corpus["carphone"]
    picked = {}
    for mode in ("fast", "exact"):
        with VideoReader(str(path), LIMITS) as reader:
            picked[mode] = [(f.t, f.image) for f in reader.sample(32 if clip.startswith("scenery") else 12, mode=mode)]
            assert reader.info.sampling == mode
    assert [t for t, _ in picked["fast"]] == [t for t, _ in picked["exact"]]
    for (t, fast), (_, exact) in zip(picked["fast"], picked["exact"]):
        assert np.array_equal(fast, exact), (t, np.abs(fast.astype(int) - exact).mean())


# What FFmpeg's player (fftools' autorotate) does with the matrix PyAV writes for each: hand-derived
# from its rules (theta 90: transpose cclock_flip if m[3] > 0 else clock; 270: clock_flip if m[3] < 0
# else cclock; 180: hflip if m[0] < 0, vflip if m[4] < 0; 0: vflip if m[4] < 0), and how numpy does it.
SHOWN = {
    "hflip": (lambda x: x[:, ::-1], lambda x: x[:, ::-1]),  # (what is shown, how it was stored)
    "vflip": (lambda x: x[::-1], lambda x: x[::-1]),
    "rotate180": (lambda x: x[::-1, ::-1], lambda x: x[::-1, ::-1]),
    "cclock": (lambda x: np.rot90(x, 1), lambda x: np.rot90(x, -1)),
    "clock": (lambda x: np.rot90(x, -1), lambda x: np.rot90(x, 1)),
    "transpose": (lambda x: x.transpose(1, 0, 2), lambda x: x.transpose(1, 0, 2)),
    "antitranspose": (lambda x: x[::-1, ::-1].transpose(1, 0, 2), lambda x: x[::-1, ::-1].transpose(1, 0, 2)),
}


@pytest.mark.parametrize("hflip,vflip,rotation,player", [
    (True, False, 0, "hflip"), (False, True, 0, "vflip"), (True, True, 0, "rotate180"), (False, False, 90, "cclock"),
    (False, False, -90, "clock"), (True, False, 90, "antitranspose"), (False, True, 90, "transpose")])
def test_a_mirrored_picture_is_shown_as_a_player_shows_it(hflip, vflip, rotation, player, tmp_path):
    """A display matrix may mirror the picture as well as turn it, and FFmpeg's player applies both.
    Taken for its rotation alone, a mirrored one (which FFmpeg reports as turned 180°) came out upside
    down, and the face in it was not found. Stored here so that the player shows the faces upright:
    that is what is sampled."""
    faces = carphone_frames()[:24:3]
    show, store = SHOWN[player]
    assert np.array_equal(show(store(faces[0])), faces[0])
    path = tmp_path / "mirrored.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8, options={"crf": "0"})
        h, w = store(faces[0]).shape[:2]
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for image in faces:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(store(image)), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with VideoReader(str(path), LIMITS) as reader:
        shown = [s.image for s in reader.sample(len(faces), mode="exact")]
        assert (reader.info.width, reader.info.height) == (176, 144)
    assert len(shown) == len(faces)
    for image, face in zip(shown, faces):
        assert image.shape == face.shape and np.abs(image.astype(int) - face).mean() < 3


def test_matroska_video_shorter_than_its_audio_is_not_taken_for_cut_short(tmp_path):
    """Matroska gives no stream a duration, and the container's spans its longest track: 2 s of video
    under 10 s of audio read as a 10 s video cut short at 2 s (`truncated`), and a short video under
    a long soundtrack could pass the duration limit. The video track's own DURATION tag says 2 s."""
    path = tmp_path / "short-video-long-audio.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 176, 144, "yuv420p"
        audio = out.add_stream("aac", rate=44100)
        for image in carphone_frames()[:50]:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        for i in range(10 * 44100 // 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    with av.open(str(path)) as container:
        assert container.duration / av.time_base > 9.9  # what was taken before
    with VideoReader(str(path), LIMITS) as reader:
        samples = list(reader.sample(8))
        assert reader.info.duration_s == pytest.approx(2.0) and not reader.info.truncated
        assert reader.info.declared_duration_s is None
    assert len(samples) == 8 and samples[-1].t < 2.0


def test_matroska_that_starts_late_is_not_taken_for_cut_short(tmp_path):
    """Matroska states where the file ends: 10 s of video kept at their timestamps from 8 s (a cut made
    without re-timing) end at 18 s, and were read as 18 s of video cut at 10."""
    from fractions import Fraction

    from media import encode, scenery_frames

    path = encode(tmp_path / "late.mkv", scenery_frames(250, size=(72, 96)), rate=25,
                  pts=[8000 + 40 * i for i in range(250)], time_base=Fraction(1, 1000))
    with av.open(str(path)) as container:
        assert container.duration / av.time_base == pytest.approx(18.0)
    for mode in ("fast", "exact"):
        with VideoReader(str(path), LIMITS) as reader:
            samples = list(reader.sample(16, mode=mode))
            assert (reader.info.duration_s, reader.info.truncated, reader.info.sampling) == (10.0, False, mode)
        assert len(samples) == 16 and samples[-1].t > 9.0


def test_a_degenerate_display_matrix_rotates_nothing(tmp_path):
    """An all-zero display matrix: FFmpeg reports its rotation as INT_MIN, which turned every frame
    sideways and went into the verdict as the rotation."""
    frames = carphone_frames()[:16]
    path = tmp_path / "zero-matrix.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        stream.set_display_matrix([0, 0, 0, 0, 0, 0, 0, 0, 1 << 30])
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with VideoReader(str(path), LIMITS) as reader:
        [first] = list(reader.sample(1))
        assert reader.info.rotation == 0 and (reader.info.width, reader.info.height) == (176, 144)
    assert first.image.shape == (144, 176, 3)


def retimed_ts(data: bytes, frame_no: int, pts_s: float) -> bytes:
    """An MPEG-TS file with one video frame's PES timestamps (PTS, and DTS when present) rewritten."""
    def stamp(value: int, marker: int) -> bytes:
        return bytes([(marker << 4) | (((value >> 30) & 7) << 1) | 1, (value >> 22) & 0xFF,
                      (((value >> 15) & 0x7F) << 1) | 1, (value >> 7) & 0xFF, ((value & 0x7F) << 1) | 1])

    out, n = bytearray(data), -1
    for off in range(0, len(out), 188):
        packet = out[off:off + 188]
        p = 4 + (1 + packet[4] if (packet[3] >> 4) & 2 else 0)
        if not packet[1] & 0x40 or packet[p:p + 4] != b"\x00\x00\x01\xe0":
            continue  # not the start of a video PES
        n += 1
        if n == frame_no:
            flags, at, value = packet[p + 7] >> 6, off + p + 9, int(pts_s * 90000)
            out[at:at + 5] = stamp(value, 2 if flags == 2 else 3)
            if flags == 3:
                out[at + 5:at + 10] = stamp(value, 1)
            return bytes(out)
    raise ValueError(f"no frame {frame_no}")


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_one_frame_timed_back_leaves_the_timeline_as_it_was(mode, tmp_path):
    """Only a key frame timed back and followed on its new timeline restarts it (joined segments):
    one damaged (or forged) timestamp is not a restart, which pushed every later frame seconds on and
    made the frame before the gap stand for 10 of the samples."""
    from media import encode, scenery_frames

    frames = scenery_frames(250, size=(72, 96))
    clean = encode(tmp_path / "clean.ts", frames, rate=25, options={"bframes": "0", "crf": "10"})
    glitched = tmp_path / "glitched.ts"
    glitched.write_bytes(retimed_ts(clean.read_bytes(), 125, 1.9))  # frame 125 of 250: 1.9 s, not 5.0 s
    with av.open(str(glitched)) as container:
        times = [round(f.time, 2) for f in container.decode(video=0)]
    assert times.index(1.9) > 100 and times[times.index(1.9) - 1] > 4.5
    with VideoReader(str(glitched), LIMITS) as reader:
        samples = list(reader.sample(32, mode=mode))
        assert reader.info.duration_s == pytest.approx(10.0) and reader.info.declared_duration_s is None
    shown = [int(np.argmin([np.abs(s.image.astype(int) - f).mean() for f in frames])) for s in samples]
    assert len(shown) == 32 and len(set(shown)) == 32  # spread as over the clean file


def test_a_frame_claiming_to_last_1000_s_does_not_hide_a_cut(tmp_path):
    """A frame's own duration is believed only as far as the frames before it were shown: the last
    frame of a cut file claiming 1000 s made it look whole."""
    from hostile_builders import Assets
    from hostile_display import b_frame_rate_claims_1000_s
    from media import truncate

    full = tmp_path / "claims-1000-s.mkv"
    b_frame_rate_claims_1000_s(full, Assets())
    cut = truncate(full, tmp_path / "cut.mkv", 0.5)
    for mode in ("fast", "exact"):
        with pytest.raises(ModerationError) as refused:
            with VideoReader(str(cut), LIMITS) as reader:
                list(reader.sample(16, mode=mode))
        assert refused.value.code == ErrorCode.CORRUPT, mode


@pytest.mark.parametrize("stills,seconds", [(1, 5), (3, 10)])
def test_a_slideshow_of_frames_shown_for_seconds_is_sampled_not_corrupt(stills, seconds, tmp_path):
    """A frame shown for seconds lasts its own duration, not the 1 s a rate held to 1 fps gives it:
    3 stills of 10 s each looked like 21 s of a declared 30 s, and were called damaged."""
    from fractions import Fraction

    from media import encode

    frames = carphone_frames()
    path = encode(tmp_path / "slides.mp4", [frames[i * 30] for i in range(stills)], rate=Fraction(1, seconds))
    with VideoReader(str(path), LIMITS) as reader:
        samples = list(reader.sample(8))
        assert reader.info.duration_s == pytest.approx(stills * seconds) and not reader.info.truncated
    assert {int(s.t // seconds) for s in samples} == set(range(stills))  # every still sampled


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_segments_joined_with_cat_are_sampled_to_the_end(mode, tmp_path):
    """MPEG-TS segments joined byte for byte (`cat a.ts b.ts`) start their timestamps again: taken as
    they were, the second segment lay over the first, and only the first (here 4 s without a face)
    was sampled. Played on, it is: the samples past 4 s are the second segment's frames."""
    from media import encode, scenery_frames

    faces = carphone_frames()[:100]
    h, w = faces[0].shape[:2]
    first = encode(tmp_path / "a.ts", scenery_frames(100, size=(h, w)), rate=25)
    second = encode(tmp_path / "b.ts", faces, rate=25)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with VideoReader(str(joined), LIMITS) as reader:
        samples = list(reader.sample(32, mode=mode))
        assert reader.info.duration_s == pytest.approx(8.0, abs=0.1) and reader.info.declared_duration_s == 4.0
    later = [s for s in samples if s.t > 4.2]
    assert len(later) >= 12 and samples[-1].t > 7.5
    for s in later:  # each the second segment's frame shown then (lossy: a few levels off)
        shown = faces[min(int(round((s.t - 4.0) * 25)), len(faces) - 1)]
        assert np.abs(s.image.astype(int) - shown).mean() < 12, s.t


def test_the_fast_pass_gives_way_to_the_exact_one_where_its_frames_would_not_fit(tmp_path):
    """The fast pass holds its picks until it has them all: 32 decoded 96×72 yuv420p frames (13,824
    bytes each with FFmpeg's line padding). Under that budget the exact pass, one frame at a time,
    samples the same frames."""
    from dataclasses import replace

    from media import encode, scenery_frames

    clip = encode(tmp_path / "gop.mp4", scenery_frames(300, size=(72, 96)), rate=30)
    with av.open(str(clip)) as container:
        held = 32 * sum(p.buffer_size for p in next(container.decode(video=0)).planes)
    picked = {}
    for budget, mode in ((held, "fast"), (held - 1, "exact")):
        with VideoReader(str(clip), replace(LIMITS, fast_pass_max_bytes=budget)) as reader:
            picked[mode] = [(f.t, f.image.tobytes()) for f in reader.sample(32, mode="fast")]
            assert reader.info.sampling == mode
    assert picked["exact"] == picked["fast"] and len(picked["fast"]) == 32

    # A stream that grows mid-way (176×144, then 352×288): judged by its largest frame, not its first.
    from hostile_builders import Assets, b_ts_resolution_change

    grows = tmp_path / "grows.ts"
    b_ts_resolution_change(grows, Assets())
    with av.open(str(grows)) as container:
        small = min(sum(p.buffer_size for p in f.planes) for f in container.decode(video=0))
    for budget, mode in ((10**9, "fast"), (8 * small, "exact")):
        with VideoReader(str(grows), replace(LIMITS, fast_pass_max_bytes=budget)) as reader:
            assert len(list(reader.sample(8, mode="fast"))) == 8 and reader.info.sampling == mode


def test_fast_sampling_picks_what_exact_picks_on_short_slices(corpus):
    """100 samples of 120 frames: slices under a frame and a half, most samples on non-reference
    frames, each decoded because it is shown at a sample time (it used to fall back to exact)."""
    with VideoReader(str(corpus["carphone"]), LIMITS) as reader:
        fast = list(reader.sample(100, mode="fast"))
        assert reader.info.sampling == "fast" and reader.info.frames_sampled == 100
    with VideoReader(str(corpus["carphone"]), LIMITS) as reader:
        exact = list(reader.sample(100, mode="exact"))
    assert len({f.t for f in fast}) == 100 and fast[0].t < 0.1 and fast[-1].t > 3.8
    for a, b in zip(fast, exact, strict=True):
        assert a.t == b.t and np.array_equal(a.image, b.image)


def test_fast_sampling_falls_back_to_exact(corpus):
    """Frames past the declared duration send the fast pass back to an exact one, which reopens the
    decoder (the fast pass ran it with slice threads), from a file object too, and gives exactly what
    an exact pass gives."""
    path = corpus["understated_duration_mkv"]
    with VideoReader(str(path), LIMITS) as reader:
        frames = list(reader.sample(8, mode="fast"))
        assert reader.info.sampling == "exact"
    with open(path, "rb") as fh, VideoReader(fh, LIMITS) as reader:
        from_stream = list(reader.sample(8, mode="fast"))
        assert reader.info.sampling == "exact"
    with VideoReader(str(path), LIMITS) as reader:
        exact = list(reader.sample(8, mode="exact"))
    assert len(exact) > 8
    for a, b, c in zip(frames, from_stream, exact, strict=True):
        assert a.t == b.t == c.t
        assert np.array_equal(a.image, c.image) and np.array_equal(b.image, c.image)


@pytest.mark.parametrize("container", ["mp4", "ts"])
def test_the_fast_pass_threads_by_the_slices_of_the_stream(container, tmp_path):
    """One slice per frame (x264's default, most uploads): frame threads, as slice threads decoded it on
    one core (1.35× slower at 1080p); two or more: slice threads. Read from the first packet, in
    MP4's length-prefixed units and MPEG-TS's Annex B alike; the frames are the same either way."""
    from media import encode, scenery_frames

    from worker import h264

    frames = scenery_frames(60, size=(72, 96))
    chosen = {}
    for n in (1, 2, 3):
        params = "sliced-threads=0" if n == 1 else f"sliced-threads=1:threads={n}:slices={n}"
        path = encode(tmp_path / f"{n}.mp4", frames, rate=30, options={"x264-params": params})
        if container == "ts":
            path = remux(path, tmp_path / f"{n}.ts", "mpegts")
        with av.open(str(path)) as probe:
            stream = probe.streams.video[0]
            counted = [h264.slices(bytes(p), stream.codec_context.extradata) for p in probe.demux(stream) if p.size]
        assert set(counted) == {n}, counted
        images = {}
        for threading in ("BY_SLICES", "SLICE"):
            reader_class = type("Reader", (VideoReader,), {"FAST_PASS_THREADING": threading})
            with reader_class(str(path), LIMITS) as reader:
                images[threading] = [f.image for f in reader.sample(8, mode="fast")]
                assert reader.info.sampling == "fast"
                if threading == "BY_SLICES":
                    chosen[n] = reader._stream.thread_type
        assert all(np.array_equal(a, b) for a, b in zip(images["BY_SLICES"], images["SLICE"]))
    assert chosen == {1: av.codec.context.ThreadType.AUTO, 2: av.codec.context.ThreadType.SLICE,
                      3: av.codec.context.ThreadType.SLICE}
    assert h264.slices(b"", None) is None and h264.slices(b"\x00\x00\x01\x67\x42", None) is None  # no slice
    assert h264.slices(b"\x00\x00\x00\x09\x65", b"\x01\x64\x00\x1f\xff") is None  # a length past the end


def test_a_cut_or_damaged_one_slice_stream_is_sampled_as_with_slice_threads(tmp_path):
    """Frame threads (chosen for one-slice H.264) drop the frames in flight where a packet fails: a
    cut file's last (flagged by the demuxer, with no decode error) or a damaged one. Such a stream is
    sampled again with slice threads, so every cut point and damage gives what 0.4.4 gave: the first
    try of this change sampled 15 of 50 cut points otherwise (an earlier last sample, `corrupt`)."""
    import shutil

    from media import damage_packet, damage_tail, encode, scenery_frames, truncate

    full = encode(tmp_path / "one-slice.mp4", scenery_frames(120, size=(72, 96)), rate=24,
                  options={"x264-params": "sliced-threads=0"}, container_options={"movflags": "+faststart"})
    damaged = tmp_path / "damaged.mp4"
    shutil.copy(full, damaged)
    damage_packet(damaged, 2.0)
    files = [truncate(full, tmp_path / f"cut-{f}.mp4", f) for f in (0.6, 0.78, 0.86, 0.94, 0.98)]
    files += [damaged, damage_tail(full, tmp_path / "dead-tail.mp4", 4.0)]

    def sampled(path: Path, threading: str):
        reader_class = type("Reader", (VideoReader,), {"FAST_PASS_THREADING": threading})
        try:
            with reader_class(str(path), LIMITS, threads=4) as reader:
                frames = list(reader.sample(8, mode="fast"))
                info = reader.info
                return (info.sampling, info.truncated, info.duration_s, info.decode_errors,
                        [f.t for f in frames]), [f.image for f in frames]
        except ModerationError as exc:
            return (type(exc).__name__, str(exc)), []

    for path in files:
        (chosen, images), (sliced, expected) = sampled(path, "BY_SLICES"), sampled(path, "SLICE")
        assert chosen == sliced, path.name
        assert len(images) == len(expected) and all(np.array_equal(a, b) for a, b in zip(images, expected)), path.name
