"""Hostile-corpus builders (hostile_media.py) for files whose face a player shows but stored pixels
or headers hide from a sampler: anamorphic pixels, a face in the alpha channel, an alpha plane under
a reserved colour matrix, pictures one after another in an image file, an animated WebP, a playlist
naming another file, and a frame rate that claims a frame every 1000 s."""
from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from hostile_builders import Assets
from media import carphone_frames, encode, scenery_frames


def write(path: Path, images: list[np.ndarray], *, codec: str, pix_fmt: str, in_fmt: str = "rgb24",
          rate: int = 4, sar: Fraction | None = None, fmt: str | None = None, options: dict | None = None) -> None:
    """Encode frames given in `in_fmt` (rgb24 or rgba), the stream's pixels `sar` wide each."""
    h, w = images[0].shape[:2]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = stream.sample_aspect_ratio = sar
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=in_fmt)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def b_anamorphic(path: Path, a: Assets) -> None:
    """Faces stored squashed to a third of their width, with 3:1 pixels: a player shows them whole,
    and the detector found none in the stored 58×144 pictures."""
    write(path, [cv2.resize(f, (58, 144), interpolation=cv2.INTER_AREA) for f in a.faces], codec="libx264",
          pix_fmt="yuv420p", sar=Fraction(3, 1))


def _alpha_face(face: np.ndarray) -> np.ndarray:
    """Colour planes black, the face drawn in the alpha channel: over a white page a grey face shows."""
    rgba = np.zeros((*face.shape[:2], 4), np.uint8)
    rgba[..., 3] = 255 - cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    return rgba


def b_face_in_alpha(path: Path, a: Assets) -> None:
    write(path, [_alpha_face(f) for f in a.faces[:8]], codec="png", pix_fmt="rgba", in_fmt="rgba")


def b_opaque_rgba(path: Path, a: Assets) -> None:
    """An alpha channel that is fully opaque: nothing hides, the faces are scored."""
    opaque = [np.dstack([f, np.full(f.shape[:2], 255, np.uint8)]) for f in a.faces[:8]]
    write(path, opaque, codec="png", pix_fmt="rgba", in_fmt="rgba")


def b_prores_alpha_bad_colour_matrix(path: Path, a: Assets) -> None:
    """Opaque ProRes 4444 (alpha plane) whose frame headers name matrix_coefficients 255, a reserved
    code: swscale refuses to convert such frames (ENOTSUP), with or without alpha."""
    opaque = [np.dstack([f, np.full(f.shape[:2], 255, np.uint8)]) for f in a.faces[:8]]
    write(path, opaque, codec="prores_ks", pix_fmt="yuva444p10le", in_fmt="rgba", fmt="mov")
    data = bytearray(path.read_bytes())
    i = data.find(b"icpf")
    while i >= 0:  # "icpf", header size, version, creator, width, height, flags, reserved, primaries, transfer
        data[i + 4 + 2 + 2 + 4 + 2 + 2 + 1 + 1 + 1 + 1] = 0xFF  # matrix
        i = data.find(b"icpf", i + 4)
    path.write_bytes(bytes(data))


def b_vp9_alpha(path: Path, a: Assets) -> None:
    """WebM VP9 with alpha (alpha_mode 1), which FFmpeg's own VP9 decoder drops."""
    write(path, [_alpha_face(f) for f in a.faces[:8]], codec="libvpx-vp9", pix_fmt="yuva420p", in_fmt="rgba")


def b_png_sequence(path: Path, a: Assets) -> None:
    """PNG after PNG in one file: FFmpeg's png_pipe demuxer, and players, show them as a video."""
    path.write_bytes(b"".join(cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes()
                              for f in a.faces[:8]))


def b_animated_webp(path: Path, a: Assets) -> None:
    """An animated WebP: browsers play it like a GIF; FFmpeg's webp decoder takes only stills."""
    write(path, a.faces[:8], codec="libwebp_anim", pix_fmt="yuv420p", fmt="webp")


def b_hls_playlist(path: Path, a: Assets) -> None:
    """An HLS playlist naming a face video elsewhere on the machine by its absolute path."""
    segment = path.with_name(path.stem + "_segment.ts")
    encode(segment, a.faces, rate=4, fmt="mpegts")
    path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:3.75,\nfile://{segment.resolve()}\n#EXT-X-ENDLIST\n")


def b_frame_rate_claims_1000_s(path: Path, a: Assets) -> None:
    """24 s at 25 fps, the face from 3 s to 21 s (held on screen 11-17 s), scenery around it, in a
    Matroska track whose DefaultDuration claims 1000 s a frame (0.001 fps). Taken at its word, the
    first frame (scenery) stood for every sample time; the face was never looked at."""
    faces, scenery = carphone_frames(), scenery_frames(50, size=(144, 176))
    images, pts = [], []
    for t in range(0, 24000, 40):
        if 11000 < t < 17000:
            continue  # the face frame at 11 s stays on screen until 17 s
        images.append(faces[(t // 40) % len(faces)] if 3000 <= t < 21000 else scenery[(t // 40) % len(scenery)])
        pts.append(t)
    encode(path, images, rate=25, pts=pts, time_base=Fraction(1, 1000), options={"preset": "ultrafast"})
    data = bytearray(path.read_bytes())
    at, lang = data.find(b"\x23\xe3\x83\x84"), data.find(b"\x22\xb5\x9c\x83und")  # DefaultDuration, Language
    assert at > 0 and lang > 0, "the muxer's track header changed"
    # DefaultDuration's 4-byte value becomes 8 bytes of 1000 s (in ns); the 7-byte Language element
    # becomes a 3-byte Void, so no offset after both moves. The later one is edited first.
    edits = [(at, 8, b"\x23\xe3\x83\x88" + (1000 * 10**9).to_bytes(8, "big")), (lang, 7, b"\xec\x81\x00")]
    for pos, length, new in sorted(edits, reverse=True):
        data[pos:pos + length] = new
    path.write_bytes(bytes(data))



def b_container_says_anamorphic(path: Path, a: Assets) -> None:
    """The faces of b_anamorphic with square pixels in the H.264 bitstream (VUI 1:1) and 3:1 in the MP4's
    `pasp` box: FFmpeg (and so ffplay) takes the container's ratio, and so must the worker."""
    write(path, [cv2.resize(f, (58, 144), interpolation=cv2.INTER_AREA) for f in a.faces], codec="libx264",
          pix_fmt="yuv420p", sar=Fraction(1, 1))
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack(">I4sII", 16, b"pasp", 1, 1))
    assert at > 0, "the muxer no longer writes a pasp box for square pixels"
    data[at + 8:at + 12] = struct.pack(">I", 3)  # hSpacing 3, vSpacing 1
    path.write_bytes(bytes(data))


def b_pixels_2000000_to_1(path: Path, a: Assets) -> None:
    """A 2×2 video whose MP4 `pasp` box says each pixel is 2,000,000 times wider than tall: shown
    4,000,000×2, a 2 KB file cost the face detector 4 GB (past a CPU pod's memory limit)."""
    write(path, [np.full((2, 2, 3), 90 + 5 * i, np.uint8) for i in range(16)], codec="libx264", pix_fmt="yuv420p",
          rate=8, sar=Fraction(1, 1))
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack(">I4sII", 16, b"pasp", 1, 1))
    assert at > 0, "the muxer no longer writes a pasp box for square pixels"
    struct.pack_into(">II", data, at + 8, 2_000_000, 1)
    path.write_bytes(bytes(data))


def b_still_gif(path: Path, a: Assets) -> None:
    """One face in a GIF of one frame: a picture, like a PNG (an animated GIF is a video)."""
    write(path, a.faces[:1], codec="gif", pix_fmt="rgb8", fmt="gif")


def b_rgb4_raw(path: Path, a: Assets) -> None:
    """Intact raw frames in a pixel format (4-bit RGB) swscale has no conversion to RGB for."""
    face = a.faces[0]
    with av.open(str(path), "w", format="nut") as out:
        stream = out.add_stream("rawvideo", rate=8)
        stream.width, stream.height, stream.pix_fmt = face.shape[1], face.shape[0], "rgb4"
        for image in a.faces[:8]:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format="rgb4")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
