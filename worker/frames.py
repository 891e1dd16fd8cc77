"""What a decoded frame shows a viewer, as an H×W×3 RGB array: converted by swscale (BT.601 where the
stream names a colour matrix it refuses), HDR (PQ, HLG) and BT.2020 pictures brought to SDR BT.709,
refused when partly transparent, stretched when its pixels are not square, turned upright.

The decoder (worker/decode.py) calls `displayed` for the sampled frames only.
"""
from __future__ import annotations

import errno
import queue

import av
import av.error
import cv2
import numpy as np
import structlog
from av.video.reformatter import ColorPrimaries, ColorTrc, VideoReformatter

from worker.cpus import available_cpus
from worker.errors import Corrupt, Unsupported
from worker.video import orient, shown_size

# Pixel formats whose conversion to RGB aborts the whole process inside FFmpeg (SIGABRT, FFmpeg 8.1 /
# PyAV 18.1), beyond any handler: refused before the converter sees them.
UNCONVERTIBLE = frozenset({"yaf32le", "yaf32be"})

# A frame with more than this share of its pixels not fully opaque is refused as transparent (a few
# edge pixels of a GIF's palette are not a picture hidden in the alpha channel).
TRANSPARENT_SHARE = 0.01
log = structlog.get_logger("worker.frames")


def displayed(frame: av.VideoFrame, sar: float | None, orientation: str, max_pixels: int) -> np.ndarray:
    """The frame as a player shows it: anamorphic pixels stretched to the display size, turned upright
    (`orientation`: worker.video.orientation). A shape no video of faces has is refused before the
    frame is converted (`shown_size`)."""
    size = shown_size(frame.width, frame.height, sar, max_pixels)
    image = to_rgb(frame)
    if size != (frame.width, frame.height):
        shrink = size[0] * size[1] < frame.width * frame.height
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return orient(image, orientation)


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """H×W×3 RGB. A frame that is partly transparent shows whatever lies behind it on the page, so
    what a viewer sees cannot be known here: refused (a face drawn in the alpha channel alone is
    seen over a white page and invisible over a black one)."""
    fmt = frame.format
    if fmt.has_palette or any(c.is_alpha for c in fmt.components):
        rgba = _to_ndarray(frame, "rgba")
        if np.count_nonzero(rgba[..., 3] < 255) > TRANSPARENT_SHARE * rgba.shape[0] * rgba.shape[1]:
            raise Unsupported("the video is partly transparent: what shows depends on the page behind it")
        return np.ascontiguousarray(rgba[..., :3])
    return _to_ndarray(frame, "rgb24")


# Transfer curves and primaries an SDR BT.709 picture does not have: a phone's HDR video (HLG), an
# HDR10 master (PQ), wide gamuts (BT.2020, P3). Read as if they were SDR, PQ turns dark and flat and
# BT.2020 pale: not the picture a viewer sees, nor the kind the model learnt from.
HDR_TRANSFERS = {ColorTrc.SMPTE2084, ColorTrc.ARIB_STD_B67}
WIDE_PRIMARIES = {ColorPrimaries.BT2020, ColorPrimaries.SMPTE431, ColorPrimaries.SMPTE432}  # + DCI-P3, Display P3
_idle_reformatters: queue.SimpleQueue = queue.SimpleQueue()  # kept for the process: see `_to_sdr`
_unconvertible: set[tuple] = set()  # what swscale refused to bring to SDR, said once each


def needs_sdr_conversion(frame: av.VideoFrame) -> bool:
    return frame.color_trc in HDR_TRANSFERS or frame.color_primaries in WIDE_PRIMARIES


def _to_sdr(frame: av.VideoFrame, format: str) -> np.ndarray | None:
    """The frame in SDR BT.709 by swscale's colour management (BT.2408: HDR reference white, 203
    cd/m² or 75 % HLG, becomes SDR white, and what is brighter is clipped), or None where swscale
    cannot (logged once per kind of frame; the plain conversion follows). Its reformatters are kept
    for the next frames and videos, one per conversion running at once (one per worker: each video
    decodes in a thread of its own, worker/prefetch.py, one at a time). One sets itself up again for
    each new frame size, pixel format, transfer or primaries, one to two seconds on the 2-core CPU,
    then converts a frame in tens of milliseconds (`bench/bench_hdr.py`); it holds about 40 MB at
    1080p. Its threads are the CPUs this process may use, not the host's cores."""
    kind = (frame.format.name, frame.color_trc, frame.color_primaries, frame.colorspace, format)
    if kind in _unconvertible:
        return None
    try:
        reformatter = _idle_reformatters.get_nowait()
    except queue.Empty:
        reformatter = VideoReformatter()
    try:
        return reformatter.reformat(frame, format=format, dst_color_trc=ColorTrc.BT709,
                                    dst_color_primaries=ColorPrimaries.BT709,
                                    threads=available_cpus()).to_ndarray()
    except (av.error.FFmpegError, ValueError) as exc:
        _unconvertible.add(kind)
        log.warning("hdr_not_converted", pixel_format=kind[0], transfer=int(kind[1]), primaries=int(kind[2]),
                    error=f"{type(exc).__name__}: {exc}", reason="read as SDR BT.709 instead")
        return None
    finally:
        _idle_reformatters.put(reformatter)


def _to_ndarray(frame: av.VideoFrame, format: str) -> np.ndarray:
    """The frame converted by swscale (to SDR BT.709 first where it is HDR or wide-gamut). A damaged
    header can carry a colour-matrix code swscale refuses (ENOTSUP): then convert with BT.601, what
    FFmpeg assumes when none is given."""
    if frame.format.name in UNCONVERTIBLE:
        raise Unsupported(f"pixel format {frame.format.name}, which this build cannot convert to RGB")
    if needs_sdr_conversion(frame):
        image = _to_sdr(frame, format)
        if image is not None:
            return image
    try:
        return frame.to_ndarray(format=format)
    except (av.error.FFmpegError, ValueError):
        try:
            return frame.to_ndarray(format=format, src_colorspace="ITU601")
        except (av.error.FFmpegError, ValueError) as exc:
            if getattr(exc, "errno", None) == errno.ENOTSUP:  # intact frames swscale has no conversion for
                raise Unsupported(f"pixel format {frame.format.name}, which this build cannot convert to RGB: "
                                  f"{exc}") from exc
            raise Corrupt(f"a decoded frame could not be converted to RGB: {exc}") from exc


def display_matrix(frame: av.VideoFrame) -> list[int] | None:
    """The 9 integers of the frame's DISPLAYMATRIX side data (FFmpeg's layout), or None."""
    for data in frame.side_data:
        if getattr(data.type, "name", "") == "DISPLAYMATRIX":
            raw = bytes(data)
            if len(raw) >= 36:
                return [int(v) for v in np.frombuffer(raw[:36], dtype="<i4")]
    return None
