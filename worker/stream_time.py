"""When a PyAV video stream starts and how long it says it lasts, from its headers alone.

Containers state these in different ways (a stream's own duration, the whole file's, Matroska's
end time and `DURATION` tag, a frame count at a rate): the decoder (worker/decode.py) checks the
declared duration against the limits before decoding and samples across it.
"""
from __future__ import annotations

import av

from worker.video import tag_duration


def start_s(stream: av.video.stream.VideoStream) -> float:
    """The stream's first timestamp in seconds (a live recording's clock may start hours in)."""
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def declared_duration_s(stream: av.video.stream.VideoStream, container: av.container.InputContainer) -> float | None:
    """The duration the headers declare for the video stream, or None where they declare none."""
    s = stream
    if s.duration is not None and s.time_base is not None and s.duration > 0:
        return float(s.duration * s.time_base)
    matroska = "matroska" in container.format.name
    # Matroska states where a track, or the file, ends, not how long it lasts: from a start of 8 s
    # (a cut that kept its timestamps) 10 s of video end at 18 s.
    late = start_s(s) if matroska else 0.0
    whole = None
    if container.duration is not None and container.duration > 0:
        end = container.duration / av.time_base
        whole = end - late if end > late else end
    if (tagged := tag_duration((s.metadata or {}).get("DURATION"))) is not None and tagged > late:
        # The video track's own: the container's spans a longer audio track too. The shorter of the
        # two where they differ otherwise: data past it is sampled on (`_sample_exact`).
        return min(tagged - late, whole) if whole is not None else tagged - late
    if whole is not None:
        return whole
    if s.frames and s.average_rate:
        return s.frames / float(s.average_rate)
    return None
