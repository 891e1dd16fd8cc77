"""How a VideoReader picks its frames: evenly over the duration, decoding every frame or only the
sampled ones and what they refer to, on past a duration the container understates, over the part
that plays of a file cut short, and a frame held on screen at each sample time it spans.

The decoding itself (opening, limits, packets, rewinding, conversion) is worker/decode.py's.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Iterator

import av
from av.codec.context import ThreadType

from worker import h264
from worker.errors import Corrupt
from worker.video import MAX_SAMPLED_FRAMES, SampledFrame, frames_to_sample, sample_times

# A decode that stops before this share of the declared duration means the data is cut short (then
# sampled over what is there) or does not decode (corrupt).
MIN_COVERAGE = 0.75
# Frames this far past the declared end mean the declaration understates the video: sampling goes on.
OVERRUN_TOLERANCE_S = 0.5
MAX_SHOWN_S = 60.0  # the longest a frame's own duration is believed (a slideshow's frame: seconds)
# A frame shown for longer than this many frame intervals is held: each sample time it spans samples it.
HELD_FRAMES = 1.5
# A declared frame rate below this is not taken at its word (Matroska's DefaultDuration, for one, can
# claim a frame every 1000 s while frames come every 40 ms): the windows that match frames to sample
# times, and the gap after which a frame counts as held, are sized as if frames came at least this
# often. Otherwise one frame took every sample time within half a claimed interval of it, and a face
# video was judged on its first frame. An honest slower video has its frames taken as held.
MIN_SAMPLING_FPS = 1.0
# Decoders that read skip_frame for each frame, so the fast pass can skip some and decode the sampled
# ones (checked: each gives the exact pass's frames). libdav1d (AV1) reads it once, when it opens: told
# NONREF it never decodes a non-reference frame at a sample time. The others decode every frame.
PER_FRAME_SKIP = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "vp8", "vp9"})


class DataEndsEarly(Exception):
    """The stream's packets end well before the declared duration, and what there is decodes: the file
    was cut (an upload truncated by its client, or on purpose), and a player stops there too."""

    def __init__(self, span_s: float) -> None:
        super().__init__(f"the video data ends at {span_s:.2f} s")
        self.span_s = span_s


def fast_pass_threading(ctx: av.codec.context.CodecContext, first: av.Packet) -> str:
    """The fast pass's decoder threading for a stream whose first packet is `first`. With the
    non-reference frames skipped, what is left is mostly a chain of frames that each refer to the
    last, which frame threads cannot spread but still pay for (a pipeline of thread_count frames,
    context copies): slice threads decoded a two-slice 720p clip 1.2–1.5× faster on 2 cores. But they
    spread one frame's slices only: an H.264 stream of one slice per frame (x264's default, most
    uploads) decoded on one core, 1.3× slower at 1080p than with frame threads (AUTO, what the exact
    pass uses: nothing to reopen for it). bench/bench_decode.py."""
    if ctx.name == "h264" and h264.slices(bytes(first), ctx.extradata) == 1:
        return "AUTO"
    return "SLICE"


def shown_until(last: tuple[av.VideoFrame, float], fps: float, gap_s: float | None) -> float:
    """When the frame `last` (frame, time) stops being shown: after its own duration where it has one
    (a slideshow's frame stays seconds, longer than the 1 / fps of a rate held to 1 fps or more), as
    long as the frames before it were shown (`gap_s`, between the last two): a frame's duration is
    the file's to state, and one claiming 1000 s hid that the data was cut short."""
    frame, t = last
    own = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
    believed = min(own, MAX_SHOWN_S if gap_s is None else gap_s)
    return t + max(1.0 / fps, believed)


class Sampling:
    """The sampling half of VideoReader (which provides `info`, `_stream`, `_frames`, `_frame_time`,
    `_to_sample`, `_start_time`, `_measure_duration`, `_rewind`, and `data_end`, `untimed` and
    `demux_failed` from the last pass over the packets)."""

    # Threading of the fast pass's decoder (see _pick_fast; the exact pass uses AUTO): BY_SLICES
    # chooses per stream (fast_pass_threading), SLICE or FRAME (bench/gpu_stages.py) forces one.
    FAST_PASS_THREADING = "BY_SLICES"

    def sample(self, n: int, mode: str = "exact", max_gap_s: float = 0.0) -> Iterator[SampledFrame]:
        """Yield up to n frames spread evenly over the duration, in time order; more than n on a long
        video when `max_gap_s` asks for samples at most that far apart. A frame is sampled once, except
        a frame held on screen across several sample times (a variable-rate file), sampled at each.

        mode "exact" decodes every frame and takes, for each slice centre, the first frame at or after
        it, or the frame on screen then when that one is held. "fast" decodes the frame at each slice
        centre whatever its type, and of the others only the frames other frames refer to (FFmpeg's
        skip_frame NONREF), so each sampled frame decodes as exactly as in "exact", and takes the nearest decoded frame to each centre; when some slice holds none, a
        centre falls in a held frame, or the frames run past the declared duration, it rewinds and
        decodes exactly.

        The duration is the container's word, which can understate the video: frames found past it are
        sampled on (exact mode), spaced as for a video ending at each, and `info.duration_s` becomes
        what decoded (`info.declared_duration_s` keeps the claim). It can overstate it too: a file cut
        short is marked `info.truncated` and sampled over the part that plays, over its own length when
        the fast pass finds the cut (an exact pass has sampled at the declared spacing as it decoded, so
        its samples stop at the cut). Data that is there but does not decode is Corrupt.
        """
        self.decode_error: str | None = None
        start = self._start_time()
        duration = self.info.duration_s
        if duration is None:
            duration = self._measure_duration()
        targets = sample_times(start, duration, frames_to_sample(duration, n, max_gap_s))
        fps = max(self.info.fps or 25.0, MIN_SAMPLING_FPS)
        # Untimed packets (a raw elementary stream) give frames their times by count alone, which only
        # an exact pass, decoding every frame, keeps right.
        if mode == "fast" and not self.untimed:
            try:
                picked, cut_at = self._fast(targets, start, duration, fps)
                damaged = self.fast_threads == "AUTO" and bool(
                    self.info.decode_errors or self.demux_failed or self.corrupt_packets)
            except Corrupt:
                if self.fast_threads != "AUTO":
                    raise
                damaged = True
            if damaged:
                # Frame threads drop the frames in flight where a packet fails (a cut file's last, which
                # the demuxer flags, reporting no decode error then; a damaged one), so what decoded
                # around it differs: a one-slice stream given frame threads for speed goes over again
                # with slice threads, as every stream did before 0.4.5.
                self._reopen_for_exact = True  # a fresh decoder: threading is fixed once it opens
                self._rewind()
                picked, cut_at = self._fast(targets, start, duration, fps, threading="SLICE")
            if cut_at is not None:  # sample what plays, over its own length, decoding every frame
                duration = self._cut_short(cut_at, duration)
                targets = sample_times(start, duration, frames_to_sample(duration, n, max_gap_s))
            if picked is not None:
                self.info.sampling = "fast"
                for index, (frame, t) in enumerate(picked):
                    yield self._to_sample(frame, index, t - start)
                self.info.frames_sampled = len(picked)
                return
            # Over a cut file the fast pass's slice threads stay: frame threads drop the frames in flight
            # when the cut last packet fails, a second or more of a short clip's end.
            self._rewind(keep_threads=self.info.truncated)
        self.info.sampling = "exact"
        yield from self._sample_exact(targets, start, duration, fps,
                                      spacing=lambda elapsed: elapsed / frames_to_sample(elapsed, n, max_gap_s))

    def first(self, n: int) -> Iterator[SampledFrame]:
        """The first n frames in order, as displayed (training's "consecutive frames" extraction)."""
        start = self._start_time()
        fps = self.info.fps or 25.0
        self.info.frames_sampled = 0
        for count, frame in enumerate(self._frames()):
            if count >= n:
                break
            t = self._frame_time(frame, count, start, fps)
            yield self._to_sample(frame, count, t - start)
            self.info.frames_sampled = count + 1

    def _sample_exact(self, targets: list[float], start: float, duration: float, fps: float, *,
                      spacing: Callable[[float], float]) -> Iterator[SampledFrame]:
        """Frames at the targets; past an understated duration, targets `spacing(elapsed)` apart (how far
        apart the samples of a video `elapsed` seconds long lie)."""
        j = 0
        index = 0
        last: tuple[av.VideoFrame, float] | None = None
        last_yielded = False
        held = HELD_FRAMES / fps  # a frame shown this long before the next is held (a variable rate)
        # A frame takes the sample times up to half a frame interval after it, and never more than the
        # spacing of the samples: under a slow claimed rate a sample is not taken further ahead than that.
        window = min(0.5 / fps, targets[1] - targets[0] if len(targets) > 1 else math.inf)
        for count, frame in enumerate(self._frames()):
            t = self._frame_time(frame, count, start, fps)
            # Targets well before this frame fell while the last one was on screen: a held frame (one
            # frame shown for seconds, as a variable-rate file can) is what a viewer saw at each of them,
            # so it is sampled at each; the next frame stood for them before, and a face shown only in
            # the held frame could go unsampled.
            while last is not None and j < len(targets) and targets[j] < t - held:
                yield self._to_sample(last[0], index, targets[j] - start)
                index += 1
                j += 1
            last, last_yielded = (frame, t), False
            if j == len(targets) and self._overruns(t, start, duration) and len(targets) < MAX_SAMPLED_FRAMES:
                # The data goes on past the declared duration (a container can state any): sample on,
                # spaced as the samples of a video that ended here would be.
                targets.append(targets[-1] + spacing(t - start))
            if j < len(targets) and t + window >= targets[j]:
                while j < len(targets) and targets[j] <= t + window:
                    j += 1
                yield self._to_sample(frame, index, t - start)
                index += 1
                last_yielded = True
        try:
            self._check_coverage(last, start, duration, fps)
        except DataEndsEarly as cut:  # sampled as it decoded: the samples stop at the cut
            self._cut_short(cut.span_s, duration)
            # Frame threads drop the frames in flight when the cut last packet fails: up to one per
            # thread, lost from what decoded though the data was there.
            ctx = self._stream.codec_context
            in_flight = ctx.thread_count if ctx.thread_type & ThreadType.FRAME else 0
            self._check_coverage(last, start, cut.span_s, fps, slack_s=in_flight / fps)
        if self._overruns(last[1], start, duration):
            self.info.declared_duration_s = duration
            self.info.duration_s = shown_until(last, fps, self.last_gap_s) - start
        if j < len(targets) and not last_yielded:
            yield self._to_sample(last[0], index, last[1] - start)
            index += 1
        self.info.frames_sampled = index

    @staticmethod
    def _overruns(t: float, start: float, duration: float) -> bool:
        return t >= start + duration + OVERRUN_TOLERANCE_S

    def _fast(self, targets: list[float], start: float, duration: float, fps: float,
              threading: str | None = None) -> tuple[list[tuple[av.VideoFrame, float]] | None, float | None]:
        """`_pick_fast`'s picks (None: sample exactly), and where the data ends when it is cut short."""
        try:
            return self._pick_fast(targets, start, duration, fps, threading), None
        except DataEndsEarly as cut:
            return None, cut.span_s

    def _pick_fast(
        self, targets: list[float], start: float, duration: float, fps: float, threading: str | None = None
    ) -> list[tuple[av.VideoFrame, float]] | None:
        """The decoded frame nearest each target, or None when one lies outside its slice, or when
        the picks, all held until the last, would take more than the limits' `fast_pass_max_bytes`.

        Frames no other frame refers to are skipped (NONREF: x264's defaults make half the frames
        such B-frames; only by the decoders in PER_FRAME_SKIP), except the frame shown at each target, decoded whatever its type: B-frames are
        most of what a viewer sees, and an encoder can be told to put the real face in the reference
        frames only (a P-frame every 8th) and a fake in the B-frames between, which sampling reference
        frames alone never saw. Skipping every B-frame (BIDIR, as this did on slices of 8 frames or
        more) also skipped the B-frames of x264's B-pyramid that a sampled B-frame refers to, which then
        decoded against missing references (3 levels off on average on the carphone clip, 13 on noisy
        scenery): the model was shown frames no player shows.
        """
        half_slice = duration / len(targets) / 2.0
        # The decoder's threading, chosen before it opens at the first packet (fast_pass_threading).
        choose_threads = not self._stream.codec_context.is_open
        self.fast_threads = None if choose_threads else "OPEN"  # what the decoder was given (sample)
        # Never BIDIR (see the docstring); nothing skipped where the decoder does not read it per frame.
        skip = "NONREF" if self._stream.codec_context.name in PER_FRAME_SKIP else "DEFAULT"
        self._stream.codec_context.skip_frame = skip
        half_frame = 0.5 / fps
        held = HELD_FRAMES / fps

        def skip_for(packet: av.Packet) -> str:
            """Decode the packet shown at a target in full; of the others only what is referred to."""
            nonlocal choose_threads
            if choose_threads:
                choose_threads = False
                chosen = threading or self.FAST_PASS_THREADING
                if chosen == "BY_SLICES":
                    chosen = fast_pass_threading(self._stream.codec_context, packet)
                self._stream.thread_type = chosen
                self._reopen_for_exact = chosen != "AUTO"
                self.fast_threads = chosen
            if packet.pts is None or packet.time_base is None:
                return skip
            t = float(packet.pts * packet.time_base)
            k = bisect.bisect_left(targets, t - half_frame)
            return "DEFAULT" if k < len(targets) and targets[k] <= t + half_frame else skip

        picked: list[tuple[av.VideoFrame, float]] = []
        prev: tuple[av.VideoFrame, float] | None = None
        last: tuple[av.VideoFrame, float] | None = None
        j = 0
        largest = 0  # bytes of the largest decoded frame: a stream may grow mid-way
        for count, frame in enumerate(self._frames(skip_for)):
            largest = max(largest, sum(p.buffer_size for p in frame.planes))
            if len(targets) * largest > self._limits.fast_pass_max_bytes:
                return None  # the picks held at once would not fit: the exact pass holds one at a time
            current = (frame, self._frame_time(frame, count, start, fps))
            if self._overruns(current[1], start, duration):
                return None  # the exact pass samples past the declared end
            last = current
            while j < len(targets) and current[1] >= targets[j]:
                if prev is not None and targets[j] < current[1] - held and targets[j] - prev[1] > half_frame:
                    return None  # shown then: a held frame, or one skipped; the exact pass samples it
                best = current if prev is None or current[1] - targets[j] <= targets[j] - prev[1] else prev
                if abs(best[1] - targets[j]) > half_slice or (picked and picked[-1][0] is best[0]):
                    return None
                picked.append(best)
                j += 1
            prev = current
        self._check_coverage(last, start, duration, fps)
        for target in targets[j:]:  # slices after the last decoded frame
            if last is None or abs(last[1] - target) > half_slice or (picked and picked[-1][0] is last[0]):
                return None
            picked.append(last)
        return picked

    def _check_coverage(self, last: tuple[av.VideoFrame, float] | None, start: float, duration: float,
                        fps: float, slack_s: float = 0.0) -> None:
        """Corrupt when what decoded falls short of the data; DataEndsEarly when the data itself falls
        short of the declared duration: a cut file (nothing past the cut exists to show), whose coverage
        the caller then judges against the data's own end. A demuxer that failed may have stopped at
        damage a player reads past: that is not a cut."""
        if last is None:
            raise Corrupt("the video stream holds no decodable frame")
        end_t = shown_until(last, fps, self.last_gap_s)
        if end_t + slack_s - start >= MIN_COVERAGE * duration:
            return
        span = None if self.data_end is None else self.data_end - start
        if not self.demux_failed and span is not None and 0 < span < MIN_COVERAGE * duration:
            raise DataEndsEarly(span)
        # Packets that are there but do not decode may still play in a player's decoder: corrupt.
        detail = f" ({self.decode_error})" if self.decode_error else ""
        shown = f"video data ends at {end_t - start:.2f} s" if span is None or span <= end_t - start + 1.0 / fps \
            else f"video decodes to {end_t - start:.2f} s of data reaching {span:.2f} s"
        declared = self.info.declared_duration_s or duration
        raise Corrupt(f"{shown} of a declared {declared:.2f} s: damaged{detail}")

    def _cut_short(self, span: float, declared: float) -> float:
        """Record that the data ends at `span` s of a declared `declared` s; returns the span."""
        self.info.truncated = True
        self.info.declared_duration_s = declared
        self.info.duration_s = span
        return span
