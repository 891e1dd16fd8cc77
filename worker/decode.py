"""Open a video with PyAV, check it against the limits, and decode it packet by packet.

Frames are decoded in order with threaded decoding and only the sampled ones (worker/sampling.py
picks them) are converted to RGB as a player shows them (worker/frames.py) and handed on, one at a
time: the decoded video is never held in memory.
"""
from __future__ import annotations

import errno
import time
from typing import BinaryIO, Callable, Iterator

import av
import av.error

from worker.errors import Corrupt, ModerationError, NotAVideo, NoVideoStream, Timeout, TooLarge, TooLong, Unsupported
from worker.frames import display_matrix, displayed
from worker.sampling import Sampling
from worker.stream_time import declared_duration_s, start_s
from worker.video import (  # noqa: F401 - the decoder's vocabulary, importable from here too
    Limits,
    SampledFrame,
    VideoInfo,
    animated_webp,
    display_size,
    image_demuxer,
    looks_like_video_container,
    playlist_kind,
    SIDEWAYS,
    orientation,
    sample_times,
    tag_duration,
)

# FFmpeg's own per-frame pixel cap (`max_pixels`) is set to this multiple of the limit: it refuses a
# bigger picture before allocating it (a stream can declare 16×16 and then send 12000×12000 frames),
# with headroom for the stride alignment FFmpeg adds; the exact limit is checked on each frame.
DECODER_PIXEL_CAP_FACTOR = 2
# A frame timed this much before the last one starts the timestamps again (frames come out of the
# decoder in display order, so only a reset moves them back).
TIMESTAMP_RESET_S = 1.0


class VideoReader(Sampling):
    """One opened video. Use as a context manager; `info` is ready after construction, frames come
    from `sample` (worker/sampling.py)."""

    def __init__(self, media: str | BinaryIO, limits: Limits, *, threads: int = 0) -> None:
        self._media = media
        self._first_frame_checked = False  # the rotation is read from the first decoded frame
        self._limits = limits
        self._threads = threads
        self._reopen_for_exact = False  # the fast pass's decoder (see Sampling._pick_fast)
        self.untimed, self._untimed_packets = False, 0  # set by a pass over packets without timestamps
        self._started = time.monotonic()
        head = self._read_head(media)
        if kind := playlist_kind(head):
            raise Unsupported(f"{kind}, which names other files or streams for a player to fetch: this worker "
                              "scores the upload itself, not what it points at")
        self._sar: float | None = None  # the pixels' aspect ratio, read with the rotation from the first frame
        self._orientation = "none"  # how the pictures are turned upright (worker.video.orientation)
        self.last_gap_s: float | None = None  # between the last two frames timed (worker.sampling.shown_until)
        self._decoder_options = {"max_pixels": str(limits.max_pixels * DECODER_PIXEL_CAP_FACTOR)}
        try:
            self._container = self._open(media)
        except av.error.FFmpegError as exc:
            self._raise_open_error(head, exc)
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            self._raise_open_error(head, exc)
        try:
            self._stream = self._pick_stream(head)
            self._stream.thread_type = "AUTO"
            self._stream.codec_context.thread_count = threads
            self.info = self._probe()
        except BaseException:
            self._container.close()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _open(self, media: str | BinaryIO) -> av.container.InputContainer:
        """av.open with the decoders' pixel cap for the probe too: opening decodes the first frames
        (avformat_find_stream_info) with decoders of its own, which would otherwise allocate whatever a
        header claims (a VP9 keyframe claiming 16000×16000 took 477 MB before any check could run).
        Where a container declares its streams before probing (MP4, Matroska, AVI) the cap reaches
        them; a refused probe picture leaves a 0×0 size, and the capped decoder refuses it again as
        too_large."""
        # No protocol beyond the upload's own: a demuxer that opens what a file names gets nothing.
        whitelist = {"protocol_whitelist": "file" if isinstance(media, str) else "none"}
        return av.open(media, mode="r", metadata_errors="ignore", options={**self._decoder_options, **whitelist})

    @staticmethod
    def _read_head(media: str | BinaryIO) -> bytes:
        if isinstance(media, str):
            with open(media, "rb") as fh:
                return fh.read(512)
        pos = media.tell()
        head = media.read(512)
        media.seek(pos)
        return head

    @staticmethod
    def _raise_open_error(head: bytes, exc: Exception) -> None:
        if not head:
            raise NotAVideo("the file is empty") from exc
        if looks_like_video_container(head):
            raise Corrupt(f"video container could not be read: {exc}") from exc
        raise NotAVideo(f"not a recognised video format: {exc}") from exc

    def _pick_stream(self, head: bytes) -> av.video.stream.VideoStream:
        fmt = self._container.format.name
        if image_demuxer(fmt):
            if animated_webp(head):  # the webp decoder takes only stills: one packet, one frame
                raise Unsupported("an animated WebP, which this build cannot decode frame by frame")
            if self._container.streams.video and not self._several_pictures(self._container.streams.video[0]):
                raise NotAVideo(f"a still image ({fmt}), not a video")
            # Pictures one after another (PNGs, JPEGs in a row): a player shows them as a video.
        videos = [s for s in self._container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        if not videos:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            raise NoVideoStream(f"no video stream (streams: {', '.join(kinds)})")
        if len(videos) > 1:
            # Players differ in which they show (the first, the default-flagged one, the largest) and let
            # viewers switch: scoring one would let a second stream carry an unseen face.
            raise Unsupported(f"{len(videos)} video streams: a player may show any of them, and this worker scores one")
        stream = videos[0]
        if any(k.lower() == "alpha_mode" and v == "1" for k, v in stream.metadata.items()):
            # WebM's VP8/VP9 alpha rides beside the picture, and FFmpeg's own decoders drop it.
            raise Unsupported("a video with an alpha channel this build does not decode: what shows depends on "
                              "the page behind it")
        if stream.codec_context is None:
            # (PyAV exposes no codec name for a stream FFmpeg has no decoder for.)
            raise Unsupported("no decoder in this build for the video stream's codec")
        stream.codec_context.options = dict(self._decoder_options)
        return stream

    def _several_pictures(self, stream: av.video.stream.VideoStream) -> bool:
        """Whether an image demuxer holds more than one picture (then reopened at the first)."""
        packets = 0
        try:
            for packet in self._demux(stream):
                packets += packet.size > 0
                if packets > 1:
                    break
        except (av.error.FFmpegError, ValueError):
            pass
        if packets > 1:
            self._stream = stream
            self._restart(reopen=True)
        return packets > 1

    def _probe(self) -> VideoInfo:
        s, ctx = self._stream, self._stream.codec_context
        width, height = ctx.width, ctx.height
        if width * height > self._limits.max_pixels:
            raise TooLarge(f"frame size {width}x{height} exceeds the limit of {self._limits.max_pixels} pixels")
        duration = declared_duration_s(self._stream, self._container)
        if duration is not None and duration > self._limits.max_duration_s:
            raise TooLong(f"duration {duration:.1f} s exceeds the limit of {self._limits.max_duration_s:.0f} s")
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else None
        # Rotation lives in each frame's display matrix: sample() reads it from the first frame.
        return VideoInfo(
            container=self._container.format.name, codec=ctx.name, width=width, height=height,
            fps=fps, duration_s=duration, rotation=0,
        )

    def _start_time(self) -> float:
        return start_s(self._stream)

    # -- sampling ------------------------------------------------------------------------------
    def _check_deadline(self) -> None:
        if time.monotonic() - self._started > self._limits.decode_timeout_s:
            raise Timeout(f"decoding took longer than {self._limits.decode_timeout_s:.0f} s")

    def _frames(self, skip_for: Callable[[av.Packet], str] | None = None) -> Iterator[av.VideoFrame]:
        """Decoded frames in order, packet by packet as a player decodes them.

        A packet the decoder refuses is skipped and counted (`info.decode_errors`), and decoding goes on
        with the next: one damaged packet must not hide the rest of the video. `container.decode` would
        stop at the first such packet, so 3 KB of garbage before the last quarter of an MP4 hid that
        quarter from the model while players went on showing it. Damage in the container itself (the
        demuxer fails) ends the stream there. `skip_for(packet)` names the decoder's `skip_frame` for
        each packet (the fast pass decodes the frames it samples in full, the others only as needed).
        """
        decoded = 0
        self.info.decode_errors = 0
        self.data_end: float | None = None  # where the stream's packets end (s), decodable or not
        self.untimed = False  # packets without timestamps, laid end to end (a raw elementary stream)
        self._untimed_packets = 0
        self.demux_failed = False
        self.corrupt_packets = 0  # packets the demuxer flagged: cut short (a truncated file's last), damaged
        first_error: Exception | None = None
        ctx = self._stream.codec_context
        try:
            for packet in self._demux(self._stream):
                self._check_deadline()  # per packet: a stream of refused packets yields no frame to check at
                self._note_data_end(packet)
                self.corrupt_packets += packet.is_corrupt
                if skip_for is not None and (skip := skip_for(packet)) != ctx.skip_frame:
                    ctx.skip_frame = skip
                try:
                    frames = packet.decode()
                except (av.error.FFmpegError, ValueError) as exc:
                    self._raise_if_refused_as_too_large(exc)
                    self.info.decode_errors += 1
                    first_error = first_error or exc
                    self.decode_error = str(first_error)
                    continue
                for frame in frames:
                    decoded += 1
                    yield self._checked(frame)
        except ModerationError:
            raise
        except (av.error.FFmpegError, ValueError) as exc:  # the demuxer failed: the stream ends here
            self._raise_if_refused_as_too_large(exc)
            self.demux_failed = True
            first_error = first_error or exc
            self.decode_error = str(first_error)
            for frame in self._drain():
                decoded += 1
                yield self._checked(frame)
        if decoded == 0 and first_error is not None:
            raise Corrupt(f"no frame could be decoded: {first_error}") from first_error

    def _note_data_end(self, packet: av.Packet) -> None:
        """`data_end`: the latest packet end seen, decodable or not. A raw elementary stream (Annex-B
        H.264 or HEVC, as cameras export it) has no timestamps, only the duration its demuxer gives each
        packet from the frame rate (25 fps unless the stream says otherwise, as players assume): those
        packets are laid end to end."""
        if packet.time_base is None:
            return
        if packet.pts is not None:
            end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
        elif packet.dts is None and packet.duration:
            end = (self.data_end if self.data_end is not None else 0.0) + float(packet.duration * packet.time_base)
            self.untimed = True
            self._untimed_packets += 1
        else:
            return
        self.data_end = end if self.data_end is None else max(self.data_end, end)

    def _drain(self) -> list[av.VideoFrame]:
        """The frames a threaded decoder still holds when the demuxer stopped without its flush packet."""
        try:
            return self._stream.codec_context.decode(None)
        except (av.error.FFmpegError, ValueError):
            return []

    def _checked(self, frame: av.VideoFrame) -> av.VideoFrame:
        self._check_deadline()
        if frame.width * frame.height > self._limits.max_pixels:  # any frame, not just the first
            raise TooLarge(
                f"frame size {frame.width}x{frame.height} exceeds the limit of {self._limits.max_pixels} pixels"
            )
        return frame

    def _raise_if_refused_as_too_large(self, exc: Exception) -> None:
        if self._refused_as_too_large(exc):
            raise TooLarge(
                f"a frame larger than the limit of {self._limits.max_pixels} pixels was refused by the decoder"
            ) from exc

    def _refused_as_too_large(self, exc: Exception) -> bool:
        """FFmpeg's max_pixels refusal: EINVAL from the decoder, which then holds a 0×0 (or oversized) size."""
        if getattr(exc, "errno", None) != errno.EINVAL:
            return False
        ctx = self._stream.codec_context
        pixels = ctx.width * ctx.height
        return pixels == 0 or pixels > self._limits.max_pixels

    def _rewind(self, keep_threads: bool = False) -> None:
        """Back to the start for an exact pass: reopened when the fast pass chose slice threads, since a
        decoder's threading is fixed once it is open and exact decoding wants frame threads (unless
        `keep_threads`)."""
        self._restart(reopen=self._reopen_for_exact and not keep_threads)
        self._stream.codec_context.skip_frame = "DEFAULT"
        self._first_frame_checked = False

    def _restart(self, reopen: bool = False) -> None:
        """Back to the first packet: a seek, or a fresh open where the demuxer cannot seek (EPERM from
        a Matroska file without cues, for one) or `reopen` asks for a new decoder."""
        if not reopen:
            try:
                self._container.seek(0, any_frame=False, backward=True, stream=self._stream)
                return
            except (av.error.FFmpegError, ValueError):
                pass
        index = self._stream.index
        self._container.close()
        try:
            if not isinstance(self._media, str):
                self._media.seek(0)
            self._container = self._open(self._media)
            self._stream = self._container.streams[index]  # the same bytes: the same stream
        except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
            raise Corrupt(f"the video could not be read again from its start: {exc}") from exc
        self._stream.thread_type = "AUTO"
        self._reopen_for_exact = False
        self._stream.codec_context.thread_count = self._threads
        self._stream.codec_context.options = dict(self._decoder_options)

    def _frame_time(self, frame: av.VideoFrame, count: int, start: float, fps: float) -> float:
        """The frame's time on the video's timeline. Timestamps that start again (MPEG-TS segments
        joined with `cat`, as players play them) go on from the last frame's: taken as they are, the
        segments after the first lay over it, and no sample target fell in them. A reset is a key frame
        timed well before the last frame, followed by a frame that goes on from it; any other frame
        timed back (one damaged or forged timestamp) is put just after the last, the timeline left as it was."""
        if not self._first_frame_checked:
            self._read_display(frame)
            self._first_frame_checked = True
            self._offset_s, self._last_t, self._reset = 0.0, None, None
            self.last_gap_s = None
        raw = frame.time if frame.time is not None else start + count / fps
        t = raw + self._offset_s
        reset, self._reset = self._reset, None
        if reset is not None and t < self._last_t - TIMESTAMP_RESET_S and raw >= reset[0]:
            self._offset_s = reset[1]  # the frame after the key frame went on from it: the timeline restarted
            t = raw + self._offset_s
        elif self._last_t is not None and t < self._last_t - TIMESTAMP_RESET_S:
            if frame.key_frame:
                self._reset = (raw, self._last_t + 1.0 / fps - raw)  # (its time, the offset that would follow)
            t = self._last_t + 1.0 / fps
        self.last_gap_s = None if self._last_t is None else t - self._last_t
        self._last_t = t
        if t > start + self._limits.max_duration_s:
            raise TooLong(f"video runs past the limit of {self._limits.max_duration_s:.0f} s")
        return t

    def _read_display(self, frame: av.VideoFrame) -> None:
        """How the frames are shown, read once from the first: the rotation in its side data, the pixels'
        aspect ratio from the container (or the decoder), and so the displayed size.

        Frame sizes are checked for every frame in `_frames`.
        """
        rotation = int(getattr(frame, "rotation", 0) or 0)
        # A degenerate matrix (all zeros: FFmpeg reports INT_MIN) rotates nothing: shown as stored.
        self.info.rotation = rotation if -360 <= rotation <= 360 else 0
        self._orientation = orientation(display_matrix(frame) if self.info.rotation == rotation else None,
                                        self.info.rotation)
        # The container's ratio first, as FFmpeg's av_guess_sample_aspect_ratio (and so ffplay) takes it.
        sar = self._stream.sample_aspect_ratio or self._stream.codec_context.sample_aspect_ratio
        self._sar = float(sar) if sar else None
        w, h = display_size(frame.width, frame.height, self._sar, self._limits.max_pixels)
        self.info.width, self.info.height = (h, w) if self._orientation in SIDEWAYS else (w, h)

    def _to_sample(self, frame: av.VideoFrame, index: int, t: float) -> SampledFrame:
        image = displayed(frame, self._sar, self._orientation, self._limits.max_pixels)
        return SampledFrame(index=index, t=max(0.0, float(t)), image=image)

    def _demux(self, stream: av.video.stream.VideoStream) -> Iterator[av.Packet]:
        """The stream's packets. A packet of a stream that appeared after the file was opened (damaged or
        spliced data) makes PyAV raise IndexError: a failure of the demuxer, raised as its ValueError."""
        try:
            yield from self._container.demux(stream)
        except IndexError as exc:
            raise ValueError(f"a packet of a stream the container did not declare: {exc}") from exc

    def _measure_duration(self) -> float:
        """Demux (not decode) the stream once to find its length, then rewind for decoding."""
        self.data_end = None
        self.untimed, self._untimed_packets = False, 0
        start = self._start_time()  # a live recording's clock may start hours in
        try:
            for packet in self._demux(self._stream):
                self._check_deadline()
                self._note_data_end(packet)
                if self.data_end is not None and self.data_end - start > self._limits.max_duration_s:
                    raise TooLong(f"video runs past the limit of {self._limits.max_duration_s:.0f} s")
        except (av.error.FFmpegError, ValueError) as exc:  # damaged data: the stream ends here
            if self.data_end is None:
                raise Corrupt(f"the video stream could not be read: {exc}") from exc
        if self.data_end is None:
            raise Corrupt("the video stream holds no timed packets")
        self._restart()
        duration = max(self.data_end - self._start_time(), 1e-3)
        self.info.duration_s = duration
        if self.untimed:  # frames are timed by count: at the rate the packets' durations give
            self.info.fps = self._untimed_packets / duration
        return duration

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

