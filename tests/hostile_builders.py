"""How each file of the hostile corpus (hostile_media.py) is made: with PyAV, or by editing bytes
PyAV wrote, with seeded randomness, so no binary is committed. A builder writes one file from the
shared real-face `Assets`."""
from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
from media import carphone_frames, encode, encode_audio_only, scenery_frames


def has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - av.codec.codec.UnknownCodecError and friends
        return False


def first_encoder(*names: str) -> str:
    return next((n for n in names if has_encoder(n)), names[0])


class Assets:
    """Source frames shared by the builders, decoded once."""

    def __init__(self) -> None:
        self.faces = carphone_frames()[::8]  # 15 frames of the real face clip, 176×144
        self._cache: dict[str, bytes] = {}

    def clip(self, name: str, directory: Path) -> bytes:
        """Bytes of a reference clip (built once), for the damaged variants."""
        if name not in self._cache:
            path = directory / f"_ref_{name}"
            if name == "faststart.mp4":
                encode(path, self.faces, rate=4, container_options={"movflags": "+faststart"})
            elif name == "moov_end.mp4":
                encode(path, self.faces, rate=4)
            elif name == "clip.mkv":
                encode(path, self.faces, rate=4)
            elif name == "clip.webm":
                encode(path, self.faces, codec="libvpx-vp9", rate=4)
            else:
                raise KeyError(name)
            self._cache[name] = path.read_bytes()
            path.unlink()
        return self._cache[name]


# -- helpers --------------------------------------------------------------------------------------
def flip_bits(data: bytes, *, seed: int, count: int, start: int = 0, end: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    end = len(out) if end is None else end
    for pos in rng.integers(start, end, size=count):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def tiled(image: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.tile(image, (n, n, 1)))


def tiny_jpeg(size: int = 16, pix_fmt: str = "yuvj444p") -> bytes:
    buf = io.BytesIO()
    encode(buf, [np.full((size, size, 3), 100, np.uint8)], codec="mjpeg", rate=1, pix_fmt=pix_fmt, fmt="mjpeg")
    return buf.getvalue()


def lying_jpeg(width: int, height: int) -> bytes:
    """A 16×16 JPEG whose header claims width×height, padded (COM segments) so FFmpeg's
    plausibility check (picture blocks vs packet size) lets the decoder go on and allocate it."""
    jpg = bytearray(tiny_jpeg())
    sof = jpg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, height, width)
    need = ((width + 7) // 8) * ((height + 7) // 8) // 4 + 1024
    com = bytearray()
    while len(com) < need:
        com += b"\xff\xfe" + struct.pack(">H", 65535) + bytes(65533)
    return bytes(jpg[:2]) + bytes(com) + bytes(jpg[2:])


def mux_packets(path: Path, codec: str, width: int, height: int, packets: list[bytes], *, fmt: str | None = None,
                rate: int = 8, pix_fmt: str = "yuvj444p") -> None:
    """Mux ready-made packets (no encoder) with the stream header saying width×height."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i, payload in enumerate(packets):
            p = av.Packet(payload)
            p.stream, p.pts, p.dts, p.time_base = stream, i, i, Fraction(1, rate)
            p.is_keyframe = True
            out.mux(p)


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


# -- builders -------------------------------------------------------------------------------------
def b_zero(path: Path, a: Assets) -> None:
    path.write_bytes(b"")


def b_random(path: Path, a: Assets) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 256 * 1024, dtype=np.uint8).tobytes())


def b_random_ftyp(path: Path, a: Assets) -> None:
    """An MP4 signature, then noise: looks like a video container, is not one."""
    noise = np.random.default_rng(2).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    path.write_bytes(box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2mp41") + noise)


def b_random_ebml(path: Path, a: Assets) -> None:
    noise = np.random.default_rng(3).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    path.write_bytes(b"\x1a\x45\xdf\xa3" + noise)


def b_ps_pack_header_only(path: Path, a: Assets) -> None:
    """Eight bytes of padding, then an MPEG program-stream pack start code and two bytes of its header:
    FFmpeg opens it as MPEG-PS and its demuxer fails while the worker measures the duration (this
    used to end as `internal`). Found by the fuzzer."""
    path.write_bytes(bytes(7) + b"\x04" + b"\x00\x00\x01\xba" + b"\x21\xff")


def b_text(path: Path, a: Assets) -> None:
    path.write_text("<html><body>not a video, just text named .mp4</body></html>\n" * 50)


def b_png(path: Path, a: Assets) -> None:
    encode(path, a.faces[:1], codec="png", rate=1, pix_fmt="rgb24", fmt="image2", container_options={"update": "1"})


def b_jpeg(path: Path, a: Assets) -> None:
    encode(path, a.faces[:1], codec="mjpeg", rate=1, pix_fmt="yuvj420p", fmt="mjpeg")


def b_audio(path: Path, a: Assets) -> None:
    encode_audio_only(path, seconds=1.0)


def b_cover_art(path: Path, a: Assets) -> None:
    """Audio with an embedded cover picture: a video-typed stream that is not a video."""
    with av.open(str(path), "w") as out:
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 176, 144, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        for p in cover.encode(av.VideoFrame.from_ndarray(a.faces[0], format="rgb24")):
            out.mux(p)
        for p in cover.encode():
            out.mux(p)
        tone = (0.3 * np.sin(np.arange(16000) / 10.0)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in audio.encode(frame):
            out.mux(p)
        for p in audio.encode():
            out.mux(p)


def b_mp4_no_tracks(path: Path, a: Assets) -> None:
    """A well-formed MP4 (ftyp + moov with a movie header) that holds no track at all."""
    mvhd = box(b"mvhd", bytes(4) + struct.pack(">IIII", 0, 0, 1000, 5000) + struct.pack(">IH", 0x00010000, 0x0100)
               + bytes(10) + struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000) + bytes(24)
               + struct.pack(">I", 2))
    path.write_bytes(box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2mp41") + box(b"moov", mvhd))


def b_ts_data_only(path: Path, a: Assets) -> None:
    """An MPEG-TS whose only stream is timed metadata (KLV)."""
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_data_stream("klv")
        for i in range(10):
            p = av.Packet(b"\x06\x0e\x2b\x34" + bytes(12))
            p.stream, p.pts, p.dts, p.time_base = stream, i * 100, i * 100, Fraction(1, 1000)
            out.mux(p)


def b_unknown_fourcc(path: Path, a: Assets) -> None:
    """An AVI whose video FourCC names no codec FFmpeg knows."""
    mjpeg = io.BytesIO()
    encode(mjpeg, a.faces[:4], codec="mjpeg", pix_fmt="yuvj420p", fmt="avi", rate=4)
    data = mjpeg.getvalue()
    for tag in (b"MJPG", b"mjpg"):  # strh fccHandler and strf biCompression
        data = data.replace(tag, b"ZQX9")
    path.write_bytes(data)


def b_truncated(fraction: float, ref: str) -> Callable[[Path, Assets], None]:
    def build(path: Path, a: Assets) -> None:
        data = a.clip(ref, path.parent)
        path.write_bytes(data[: int(len(data) * fraction)])
    return build


def b_bitflip(seed: int, ref: str, count: int, region: str) -> Callable[[Path, Assets], None]:
    def build(path: Path, a: Assets) -> None:
        data = a.clip(ref, path.parent)
        if region == "head":
            path.write_bytes(flip_bits(data, seed=seed, count=count, start=0, end=min(len(data), 2048)))
        else:  # the media payload after the first 2 KiB (and before an index at the end)
            path.write_bytes(flip_bits(data, seed=seed, count=count, start=2048, end=int(len(data) * 0.8)))
    return build


def b_codec(codec: str, *, pix_fmt: str = "yuv420p", options: dict | None = None, suffix_fmt: str | None = None,
            frames: str = "faces") -> Callable[[Path, Assets], None]:
    def build(path: Path, a: Assets) -> None:
        images = a.faces if frames == "faces" else scenery_frames(8, size=(144, 176))
        encode(path, images, codec=codec, pix_fmt=pix_fmt, options=options, fmt=suffix_fmt, rate=4)
    return build


def b_sized(w: int, h: int, pix_fmt: str) -> Callable[[Path, Assets], None]:
    def build(path: Path, a: Assets) -> None:
        encode(path, [np.ascontiguousarray(f[:h, :w]) for f in a.faces[:8]], pix_fmt=pix_fmt, rate=4)
    return build


def b_vfr(path: Path, a: Assets) -> None:
    """Variable frame rate: irregular gaps from 10 ms to 1.2 s between frames."""
    gaps = [0, 40, 10, 600, 20, 1200, 40, 40, 900, 15, 300, 40, 700, 40, 500]
    pts = list(np.cumsum(gaps))
    encode(path, a.faces, rate=25, pts=[int(p) for p in pts], time_base=Fraction(1, 1000))


def b_rotated(degrees: int) -> Callable[[Path, Assets], None]:
    def build(path: Path, a: Assets) -> None:
        k = {90: -1, 180: 2, 270: 1}[degrees]  # stored turned so that the display matrix turns it back
        stored = [np.ascontiguousarray(np.rot90(f, k)) for f in a.faces]
        encode(path, stored, rate=4, rotation=degrees)
    return build


def b_container(container_options: dict | None = None, fmt: str | None = None, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict | None = None) -> Callable[[Path, Assets], None]:
    def build(path: Path, a: Assets) -> None:
        encode(path, a.faces, codec=codec, pix_fmt=pix_fmt, fmt=fmt, container_options=container_options, rate=4,
               options=options)
    return build


def b_ts_resolution_change(path: Path, a: Assets) -> None:
    """One MPEG-TS stream that switches from 176×144 to 352×288 mid-way (new SPS, same PID)."""
    first, second = io.BytesIO(), io.BytesIO()
    encode(first, a.faces[:8], rate=4, fmt="mpegts", pts=list(range(8)), time_base=Fraction(1, 4))
    big = [np.ascontiguousarray(np.repeat(np.repeat(f, 2, 0), 2, 1)) for f in a.faces[8:]]
    encode(second, big, rate=4, fmt="mpegts", pts=list(range(8, 8 + len(big))), time_base=Fraction(1, 4))
    path.write_bytes(first.getvalue() + second.getvalue())


def b_late_start(path: Path, a: Assets) -> None:
    """MPEG-TS whose clock starts ten hours in."""
    encode(path, a.faces, rate=4, fmt="mpegts", container_options={"output_ts_offset": "36000"})


def b_one_frame(path: Path, a: Assets) -> None:
    encode(path, a.faces[:1], rate=4)


def b_many_faces(path: Path, a: Assets) -> None:
    encode(path, [tiled(f, 3) for f in a.faces[:8]], rate=4)


def b_no_face(path: Path, a: Assets) -> None:
    encode(path, scenery_frames(12, size=(144, 176)), rate=4)


def b_gif(path: Path, a: Assets) -> None:
    encode(path, a.faces[:8], codec="gif", pix_fmt="rgb8", rate=4)


def b_mpeg2_ps(path: Path, a: Assets) -> None:
    encode(path, a.faces, codec="mpeg2video", rate=25, fmt="mpeg")


def b_mpeg2_bad_colour_matrix(path: Path, a: Assets) -> None:
    """MPEG-2 whose sequence display extension names matrix_coefficients 255, a reserved code:
    swscale refuses to convert such frames (ENOTSUP). Found by the fuzzer."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpeg") as out:
        s = out.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt = 176, 144, "yuv420p"
        ctx = s.codec_context
        ctx.colorspace, ctx.color_primaries, ctx.color_trc = 1, 1, 1  # BT.709: the extension gets written
        for image in a.faces:
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    data = bytearray(buf.getvalue())
    i = data.find(b"\x00\x00\x01\xb5")
    while i >= 0:
        if data[i + 4] >> 4 == 2 and data[i + 4] & 1:  # sequence display extension with a colour description
            data[i + 7] = 0xFF  # matrix_coefficients
        i = data.find(b"\x00\x00\x01\xb5", i + 4)
    path.write_bytes(bytes(data))


def b_mkv_unseekable(path: Path, a: Assets) -> None:
    """Live-mode Matroska (no duration, no cues), remuxed packet by packet with no keyframe flags: after
    the worker measures its duration FFmpeg cannot seek back to the start (EPERM, which used to end as
    an `internal` error), and no frame decodes from it. Found by the fuzzer."""
    src = io.BytesIO()
    encode(src, a.faces, rate=4, fmt="matroska")
    src.seek(0)
    with av.open(src) as inp, av.open(str(path), "w", format="matroska", options={"live": "1"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for p in inp.demux(inp.streams.video[0]):
            if p.dts is None:
                continue
            q = av.Packet(bytes(p))
            q.pts, q.dts, q.time_base, q.stream = p.pts, p.dts, p.time_base, stream
            q.is_keyframe = False
            out.mux(q)


X265 = {"x265-params": "log-level=none"}
AV1_ENCODERS = ("libsvtav1", "libaom-av1", "librav1e")
AV1_OPTIONS = {"libsvtav1": {"preset": "12"}, "libaom-av1": {"cpu-used": "8"}, "librav1e": {"speed": "10"}}


def b_av1(path: Path, a: Assets) -> None:
    codec = first_encoder(*AV1_ENCODERS)
    encode(path, a.faces, codec=codec, options=AV1_OPTIONS[codec], rate=4)
