"""A generated corpus of hostile and odd inputs, each with the outcome the worker must give.

Everything is made with PyAV (or by editing bytes PyAV wrote, with seeded randomness; the builders
are in hostile_builders.py and hostile_lies.py), so no binary is committed. `build_hostile_corpus(dir)`
writes every case and returns them by name; the tests run each through the real `Moderator`, a `deepfake moderate`
subprocess and the fuzz seeds.

An outcome is a verdict's `status` ("ok", "no_face") or, for error verdicts, its error code. The
limits the expectations assume are `HOSTILE_SETTINGS` (frames=4, 600 s, default pixel cap, 20 s decode).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hostile_builders import (
    Assets, AV1_ENCODERS, has_encoder, X265, b_audio, b_av1, b_bitflip, b_codec, b_container, b_cover_art, b_gif,
    b_jpeg, b_late_start, b_many_faces, b_mkv_unseekable, b_mp4_no_tracks, b_mpeg2_bad_colour_matrix, b_mpeg2_ps,
    b_no_face, b_one_frame, b_png, b_ps_pack_header_only, b_random, b_random_ebml, b_random_ftyp, b_rotated, b_sized,
    b_text, b_truncated, b_ts_data_only, b_ts_resolution_change, b_unknown_fourcc, b_vfr, b_zero,
)
from hostile_display import (
    b_animated_webp, b_anamorphic, b_container_says_anamorphic, b_face_in_alpha, b_frame_rate_claims_1000_s, b_hls_playlist, b_opaque_rgba,
    b_pixels_2000000_to_1, b_png_sequence, b_prores_alpha_bad_colour_matrix, b_rgb4_raw, b_still_gif, b_vp9_alpha,
)
from hostile_lies import (
    b_face_in_b_frames, b_long_declared, b_long_undeclared, b_looping_ts, b_mjpeg_header_lies,
    b_mjpeg_later_frames_lie, b_raw_header_claims, b_two_video_streams, b_understated_duration, b_vp9_keyframes_lie,
)

# The settings every case below is judged under (tests pass these to Settings / the CLI's environment).
HOSTILE_SETTINGS = {"frames": 4, "max_duration_s": 600.0, "decode_timeout_s": 20.0, "max_bytes": 256 * 1024**2}
MAX_PIXELS = 4096 * 2304  # the default pixel cap

EVERY_OUTCOME = frozenset({"ok", "no_face", "not_a_video", "no_video_stream", "corrupt", "unsupported", "too_large",
                           "too_long", "timeout", "not_found", "access_denied"})
# Damaged real video may decode into anything typed, but never `internal` (a bug) or a crash.
DAMAGED = EVERY_OUTCOME - {"not_found", "access_denied"}


@dataclass(frozen=True)
class Case:
    name: str
    filename: str
    build: Callable[[Path, "Assets"], None]
    expect: frozenset[str]
    limit_s: float = 30.0  # wall-clock bound for one moderation of this file
    note: str = ""
    min_faces: int = 0  # for ok verdicts: at least this many faces recorded
    # Cases that need limits other than HOSTILE_SETTINGS (only run in-process, never in the CLI batch).
    settings: dict = field(default_factory=dict)
    # Encoders the builder needs (any one of each tuple): a PyAV build without them skips the case.
    needs: tuple[tuple[str, ...], ...] = ()

    def missing(self) -> str | None:
        for options in self.needs:
            if not any(has_encoder(name) for name in options):
                return " or ".join(options)
        return None


CASES: list[Case] = [
    # not videos at all
    Case("zero_bytes", "zero.mp4", b_zero, frozenset({"not_a_video"})),
    Case("random_bytes", "random.mp4", b_random, frozenset({"not_a_video"})),
    Case("random_after_ftyp", "ftyp_noise.mp4", b_random_ftyp, frozenset({"corrupt"})),
    Case("random_after_ebml", "ebml_noise.mkv", b_random_ebml, frozenset({"corrupt"})),
    Case("text_named_mp4", "page.mp4", b_text, frozenset({"not_a_video"})),
    Case("ps_pack_header_only", "pack.mpg", b_ps_pack_header_only, frozenset({"corrupt"})),
    Case("png_named_mp4", "still_png.mp4", b_png, frozenset({"not_a_video"})),
    Case("jpeg_named_mp4", "still_jpeg.mp4", b_jpeg, frozenset({"not_a_video"})),
    # containers without a video stream
    Case("audio_only", "audio.mp4", b_audio, frozenset({"no_video_stream"})),
    Case("audio_with_cover_art", "cover.mp4", b_cover_art, frozenset({"no_video_stream"})),
    Case("mp4_without_tracks", "empty_moov.mp4", b_mp4_no_tracks, frozenset({"no_video_stream"})),
    Case("ts_data_stream_only", "klv.ts", b_ts_data_only, frozenset({"no_video_stream"})),
    Case("unknown_fourcc", "zqx9.avi", b_unknown_fourcc, frozenset({"unsupported"})),
    Case("two_video_streams", "two_tracks.mp4", b_two_video_streams, frozenset({"unsupported"})),
    # damaged real video
    Case("truncated_faststart_10", "trunc10.mp4", b_truncated(0.10, "faststart.mp4"), frozenset({"corrupt"})),
    Case("truncated_faststart_50", "trunc50.mp4", b_truncated(0.50, "faststart.mp4"), frozenset({"corrupt"}),
         note="cut mid-GOP: of its 2.25 s of packets (a P-frame's time) under 1 s decodes in this 4 fps clip, the "
              "B-frames before it are gone: too little of the data to call it a cut file that plays"),
    Case("truncated_moov_end_95", "trunc95_moov_end.mp4", b_truncated(0.95, "moov_end.mp4"), frozenset({"corrupt"})),
    Case("truncated_mkv_40", "trunc40.mkv", b_truncated(0.40, "clip.mkv"), frozenset({"ok"}), min_faces=1,
         note="a file cut short: scored over the 1.25 s that plays (video.truncated), as a player shows it"),
    Case("truncated_webm_97", "trunc97.webm", b_truncated(0.97, "clip.webm"), frozenset({"ok", "no_face"})),
    Case("bitflip_payload_mp4", "flip_payload.mp4", b_bitflip(11, "faststart.mp4", 40, "payload"), DAMAGED),
    Case("bitflip_payload_webm", "flip_payload.webm", b_bitflip(12, "clip.webm", 40, "payload"), DAMAGED),
    Case("bitflip_header_mp4", "flip_header.mp4", b_bitflip(13, "faststart.mp4", 16, "head"), DAMAGED),
    Case("bitflip_header_mkv", "flip_header.mkv", b_bitflip(14, "clip.mkv", 16, "head"), DAMAGED),
    # codecs and pixel formats
    Case("hevc", "hevc.mp4", b_codec("libx265", options=X265), frozenset({"ok"}), min_faces=3, needs=(("libx265",),)),
    Case("vp9", "vp9.webm", b_codec("libvpx-vp9"), frozenset({"ok"}), min_faces=3, needs=(("libvpx-vp9",),)),
    Case("av1", "av1.mp4", b_av1, frozenset({"ok"}), min_faces=3, needs=(AV1_ENCODERS,)),
    Case("mjpeg", "mjpeg.avi", b_codec("mjpeg", pix_fmt="yuvj420p"), frozenset({"ok"}), min_faces=3),
    Case("mpeg2_program_stream", "mpeg2.mpg", b_mpeg2_ps, frozenset({"ok"}), min_faces=3),
    Case("mpeg2_bad_colour_matrix", "mpeg2_matrix255.mpg", b_mpeg2_bad_colour_matrix, frozenset({"ok"}), min_faces=3),
    Case("h264_10bit", "h264_10bit.mp4", b_codec("libx264", pix_fmt="yuv420p10le"), frozenset({"ok"}), min_faces=3),
    Case("hevc_10bit_444", "hevc_444_10.mkv", b_codec("libx265", pix_fmt="yuv444p10le", options=X265),
         frozenset({"ok"}), min_faces=3, needs=(("libx265",),)),
    Case("h264_444", "h264_444.mp4", b_codec("libx264", pix_fmt="yuv444p"), frozenset({"ok"}), min_faces=3),
    Case("animated_gif", "anim.gif", b_gif, frozenset({"ok"}), min_faces=3),
    Case("still_gif_named_mp4", "still_gif.mp4", b_still_gif, frozenset({"not_a_video"}),
         note="a GIF of one frame is a picture, as a PNG is: it was scored as a video"),
    Case("rgb4_raw", "rgb4.nut", b_rgb4_raw, frozenset({"unsupported"}),
         note="intact frames swscale cannot convert: unsupported, not corrupt"),
    # geometry
    Case("tiny_1x1", "1x1.mp4", b_sized(1, 1, "yuv444p"), frozenset({"no_face"})),
    Case("tiny_2x2", "2x2.mp4", b_sized(2, 2, "yuv420p"), frozenset({"no_face"})),
    Case("odd_3x5", "3x5.mp4", b_sized(3, 5, "yuv444p"), frozenset({"no_face"})),
    Case("pixels_2000000_to_1", "pasp_2000000.mp4", b_pixels_2000000_to_1, frozenset({"unsupported"}), limit_s=5,
         note="2 KB shown 4,000,000x2: it cost the detector 4 GB and half a minute"),
    Case("raw_header_claims_16000", "raw_16000.avi", b_raw_header_claims(16000), frozenset({"corrupt", "too_large"}),
         limit_s=5, note="the probe's decoder, capped at twice max_pixels, refuses the size and reports 0×0"),
    Case("raw_header_claims_20000", "raw_20000.avi", b_raw_header_claims(20000), frozenset({"corrupt", "too_large"}),
         limit_s=5, note="FFmpeg refuses the size itself (over INT_MAX/8 bytes) and reports 0×0: an invalid header"),
    Case("mjpeg_claims_16000", "mjpeg_16000.mkv", b_mjpeg_header_lies, frozenset({"too_large"}), limit_s=10),
    Case("vp9_keyframes_claim_16000", "vp9_16000.webm", b_vp9_keyframes_lie, frozenset({"too_large"}), limit_s=10,
         needs=(("libvpx-vp9",),), note="found by the fuzzer: the probe decoder is capped too"),
    Case("mjpeg_later_frames_lie", "mjpeg_lies_later.mkv", b_mjpeg_later_frames_lie, frozenset({"too_large"}),
         limit_s=10, note="the probe sees 16×16; frames 3+ claim 12000×12000"),
    Case("resolution_change_ts", "res_change.ts", b_ts_resolution_change, frozenset({"ok"}), min_faces=3),
    Case("rotated_270", "rot270.mp4", b_rotated(270), frozenset({"ok"}), min_faces=3),
    Case("rotated_180", "rot180.mp4", b_rotated(180), frozenset({"ok"}), min_faces=3),
    # time
    Case("two_hours_declared", "2h_16px.mp4", b_long_declared, frozenset({"too_long"}), limit_s=5),
    Case("thirty_minutes_undeclared", "30min_live.mkv", b_long_undeclared, frozenset({"too_long"}), limit_s=10),
    Case("looping_timestamps", "loop.ts", b_looping_ts, frozenset({"timeout"}), limit_s=10,
         settings={"decode_timeout_s": 0.1}, note="timestamps wrap every second, 3000 times"),
    Case("variable_frame_rate", "vfr.mp4", b_vfr, frozenset({"ok"}), min_faces=3),
    Case("late_start_ts", "late_start.ts", b_late_start, frozenset({"ok"}), min_faces=3),
    Case("late_start_live_mkv", "late_live.mkv", b_container({"live": "1", "output_ts_offset": "36000"}),
         frozenset({"ok"}), min_faces=3, note="no duration declared, a clock ten hours in: it was too_long"),
    Case("one_frame", "one_frame.mp4", b_one_frame, frozenset({"ok"}), min_faces=1),
    # containers
    Case("moov_at_end", "moov_end.mp4", b_container(), frozenset({"ok"}), min_faces=3),
    Case("fragmented_mp4", "fragmented.mp4", b_container({"movflags": "frag_keyframe+empty_moov"}), frozenset({"ok"}),
         min_faces=3),
    Case("live_mkv_no_index", "live.mkv", b_container({"live": "1"}), frozenset({"ok"}), min_faces=3),
    Case("raw_h264_annex_b", "camera.h264", b_container(fmt="h264"), frozenset({"ok"}), min_faces=3,
         note="an elementary stream, no timestamps: frames timed at the demuxer's 25 fps, as players show it"),
    Case("raw_hevc_annex_b", "camera.hevc", b_container(fmt="hevc", codec="libx265", options=X265), frozenset({"ok"}),
         min_faces=3, needs=(("libx265",),)),
    Case("mkv_unseekable", "unseekable.mkv", b_mkv_unseekable, frozenset({"corrupt"})),
    # faces
    Case("many_faces_3x3", "crowd.mp4", b_many_faces, frozenset({"ok"}), min_faces=12),
    # a face hidden from a sampler that believes the header or decodes reference frames only
    Case("face_in_b_frames_only", "b_frames.mp4", b_face_in_b_frames, frozenset({"ok"}), min_faces=2),
    Case("duration_understated", "understated.mkv", b_understated_duration, frozenset({"ok"}), min_faces=2),
    Case("no_face", "scenery.mp4", b_no_face, frozenset({"no_face"})),
    # what a player shows, not what is stored (hostile_display.py)
    Case("anamorphic_3_to_1", "anamorphic.mp4", b_anamorphic, frozenset({"ok"}), min_faces=3,
         note="stored 58x144 with 3:1 pixels: stretched to 174x144 as players show it"),
    Case("anamorphic_in_container_only", "pasp_3_to_1.mp4", b_container_says_anamorphic, frozenset({"ok"}),
         min_faces=3, note="bitstream says 1:1, the MP4 3:1: players take the container's word"),
    Case("face_in_alpha", "alpha_face.mov", b_face_in_alpha, frozenset({"unsupported"}),
         note="what shows depends on the page behind it: review"),
    Case("opaque_rgba", "opaque_rgba.mov", b_opaque_rgba, frozenset({"ok"}), min_faces=3),
    Case("prores_alpha_bad_colour_matrix", "prores_matrix255.mov", b_prores_alpha_bad_colour_matrix,
         frozenset({"ok"}), min_faces=3, needs=(("prores_ks",),), note="converted as BT.601, as FFmpeg assumes"),
    Case("vp9_alpha", "alpha.webm", b_vp9_alpha, frozenset({"unsupported"}), needs=(("libvpx-vp9",),)),
    Case("png_sequence", "pngs.mp4", b_png_sequence, frozenset({"ok"}), min_faces=3,
         note="PNG after PNG in one file is a video to a player (png_pipe); one PNG alone stays not_a_video"),
    Case("animated_webp", "anim.webp", b_animated_webp, frozenset({"unsupported"}), needs=(("libwebp_anim",),)),
    Case("hls_playlist", "playlist.m3u8", b_hls_playlist, frozenset({"unsupported"}),
         note="a playlist names other files and URLs for FFmpeg to open: never followed"),
    Case("frame_rate_claims_1000_s", "slow_claim.mkv", b_frame_rate_claims_1000_s, frozenset({"ok"}), min_faces=2,
         note="DefaultDuration claims 0.001 fps: sampling windows sized for at least 1 fps"),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def build_hostile_corpus(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    assets = Assets()
    files: dict[str, Path] = {}
    for case in CASES:
        if case.missing():
            continue  # the tests skip it, naming the encoder
        path = directory / case.filename
        case.build(path, assets)
        files[case.name] = path
    return files


def canary(*args, **kwargs) -> None:
    """Touches $HOSTILE_CANARY: proof that a function named in a hostile job ran (it must never)."""
    path = os.environ.get("HOSTILE_CANARY")
    if path:
        Path(path).touch()


def outcome(verdict: dict) -> str:
    return verdict["status"] if verdict["status"] != "error" else verdict["error"]["code"]
