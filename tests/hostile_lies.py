"""Hostile-corpus builders (hostile_media.py) for files that lie: headers claiming sizes or
durations the data does not hold, streams that never end, and files that hide a face from a sampler
(a second video track, B-frames only, a duration understated)."""
from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Callable

import av
import numpy as np
from hostile_builders import Assets, lying_jpeg, mux_packets, tiny_jpeg
from media import encode, face_in_b_frames, scenery_frames, understated_duration


def b_two_video_streams(path: Path, a: Assets) -> None:
    """Scenery in the first (default) video track, the face in a second: players differ in which they
    show, and a viewer can switch."""
    scenery = scenery_frames(len(a.faces), size=a.faces[0].shape[:2])
    with av.open(str(path), "w") as out:
        first, second = (out.add_stream("libx264", rate=4) for _ in range(2))
        for s in (first, second):
            s.width, s.height, s.pix_fmt = 176, 144, "yuv420p"
        for image, face in zip(scenery, a.faces):
            for s, frame in ((first, image), (second, face)):
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(p)
        for s in (first, second):
            for p in s.encode():
                out.mux(p)


def b_face_in_b_frames(path: Path, a: Assets) -> None:
    face_in_b_frames(path)


def b_understated_duration(path: Path, a: Assets) -> None:
    understated_duration(path)


def b_raw_header_claims(size: int) -> Callable[[Path, Assets], None]:
    """Raw video in AVI (no bitstream header to contradict it) whose AVI headers declare size×size;
    the packets hold 16×16 pictures."""
    def build(path: Path, a: Assets) -> None:
        buf = io.BytesIO()
        encode(buf, [np.full((16, 16, 3), 90, np.uint8)] * 4, codec="rawvideo", pix_fmt="bgr24", fmt="avi", rate=4)
        data = bytearray(buf.getvalue())
        avih, strf = data.find(b"avih"), data.find(b"strf")
        struct.pack_into("<II", data, avih + 8 + 32, size, size)  # dwWidth, dwHeight
        struct.pack_into("<ii", data, strf + 8 + 4, size, size)  # biWidth, biHeight
        path.write_bytes(bytes(data))
    return build


def b_mjpeg_header_lies(path: Path, a: Assets) -> None:
    """MJPEG in Matroska: the container and the first JPEG say 16000×16000 (the first frame is a lie)."""
    mux_packets(path, "mjpeg", 16000, 16000, [lying_jpeg(16000, 16000)] * 2)


def b_vp9_keyframes_lie(path: Path, a: Assets) -> None:
    """VP9 in WebM, every frame a keyframe whose header claims 16000×16000 (the WebM track says 176×144):
    opening the file decodes the first frame to probe it, and that probe decoder allocated ~400 MB."""
    buf = io.BytesIO()
    encode(buf, a.faces[:6], codec="libvpx-vp9", fmt="webm", rate=4, options={"g": "1", "deadline": "realtime"})
    data = bytearray(buf.getvalue())
    at = data.find(b"\x49\x83\x42")  # a keyframe's sync code: 4 colour bits, then width-1 and height-1
    while at >= 0:
        bits = int.from_bytes(data[at - 1:at + 8], "big")  # from the frame's first byte, 72 bits
        bits = (bits & ~(((1 << 32) - 1) << 4)) | ((15999 << 20) | (15999 << 4))
        data[at - 1:at + 8] = bits.to_bytes(9, "big")
        at = data.find(b"\x49\x83\x42", at + 3)
    path.write_bytes(bytes(data))


def b_mjpeg_later_frames_lie(path: Path, a: Assets) -> None:
    """Honest 16×16 MJPEG frames, then frames whose JPEG headers claim 12000×12000: the container and
    the probe see a tiny video, the decoder would allocate ~430 MB per frame (and RGB twice that)."""
    mux_packets(path, "mjpeg", 16, 16, [tiny_jpeg()] * 2 + [lying_jpeg(12000, 12000)] * 6)


def b_long_declared(path: Path, a: Assets) -> None:
    """Two hours at 16×16, 1 fps, with the duration in the MP4 header."""
    frames = scenery_frames(50, size=(16, 16))
    encode(path, [frames[i % 50] for i in range(7200)], rate=1, options={"preset": "ultrafast"})


def b_long_undeclared(path: Path, a: Assets) -> None:
    """Thirty minutes at 16×16, 1 fps, in a live-mode Matroska: no duration, no index anywhere."""
    frames = scenery_frames(50, size=(16, 16))
    encode(path, [frames[i % 50] for i in range(1800)], rate=1, options={"preset": "ultrafast"},
           container_options={"live": "1"})


def b_looping_ts(path: Path, a: Assets) -> None:
    """One second of 16×16 MPEG-TS repeated 3000 times: time goes 0→1 s over and over, so the
    duration limit never trips and only the decode deadline can stop it (75,000 frames took 0.5 s to
    decode on a 2-core machine, sometimes just inside a 0.5 s deadline; the case's is 0.1 s)."""
    one = io.BytesIO()
    encode(one, scenery_frames(25, size=(16, 16)), rate=25, fmt="mpegts", options={"preset": "ultrafast"})
    path.write_bytes(one.getvalue() * 3000)
