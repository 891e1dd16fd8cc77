"""Sampled decode vs decode-all on 10 s H.264 clips (720p unless --height), side by side in one run.

    python bench/bench_decode.py [--frames 32] [--repeat 5] [--height 720]

Two encodings of the same frames: one slice per frame (x264's and ffmpeg's defaults) and two slices
per frame (what PyAV's encoder writes by default; some hardware encoders slice too). Decode-all is
timed with frame threads and with slice threads, and the faster is the baseline. The fast pass is
timed with its decoder threads chosen by the stream's slices (the default) and with each forced,
interleaved round by round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.clips import face_clip  # noqa: E402
from worker.decode import Limits, VideoReader  # noqa: E402

LIMITS = Limits(max_duration_s=3600, max_pixels=4096 * 4096, decode_timeout_s=600)


def decode_all(path: Path, thread_type: str) -> int:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = thread_type
        return sum(1 for _ in c.decode(s))


def sampled(path: Path, n: int, mode: str, threading: str | None = None) -> tuple[int, str]:
    """Sampled frames and the mode used; `threading` forces the fast pass's decoder threading."""
    reader = VideoReader if threading is None else type("Reader", (VideoReader,), {"FAST_PASS_THREADING": threading})
    with reader(str(path), LIMITS) as r:
        frames = list(r.sample(n, mode=mode))
        return len(frames), r.info.sampling


def interleaved(fns: dict, repeat: int) -> dict:
    """`timed` for each of `fns`, taken in turn each round, so a busier moment hits all alike."""
    times: dict = {k: [] for k in fns}
    results: dict = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v), results[k]) for k, v in times.items()}


def timed(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--height", type=int, default=720)
    args = ap.parse_args()
    print(f"median of {args.repeat} runs")
    print(f"{'clip':<9}{'method':<34}{'ms':>8}{'min ms':>8}{'frames':>8}{'vs decode-all':>15}")
    for slices in (1, 2):
        name = f"deepfake-bench-{args.height}p-{slices}slice.mp4"
        clip = face_clip(Path(tempfile.gettempdir()) / name, height=args.height, slices=slices)
        label_clip = f"{slices} slice" + ("s" if slices > 1 else "")
        rows = {}
        for thread_type in ("FRAME", "SLICE"):
            rows[thread_type] = timed(lambda: decode_all(clip, thread_type), args.repeat)
        base = min(t for t, _, _ in rows.values())
        for thread_type, (t, t_min, total) in rows.items():
            label = f"decode all ({thread_type.lower()} threads)"
            print(f"{label_clip:<9}{label:<34}{t*1e3:8.0f}{t_min*1e3:8.0f}{total:8d}{t/base:15.2f}")
        t, t_min, (n, used) = timed(lambda: sampled(clip, args.frames, "exact"), args.repeat)
        label = f"sample {args.frames}, mode=exact ({used})"
        print(f"{label_clip:<9}{label:<34}{t*1e3:8.0f}{t_min*1e3:8.0f}{n:8d}{t/base:15.2f}")
        # the fast pass's decoder threads as chosen by the stream's slices, then each forced
        fast = interleaved({"by slices": lambda: sampled(clip, args.frames, "fast"),
                            "slice thr.": lambda: sampled(clip, args.frames, "fast", "SLICE"),
                            "frame thr.": lambda: sampled(clip, args.frames, "fast", "AUTO")}, args.repeat)
        for how, (t, t_min, (n, used)) in fast.items():
            label = f"sample {args.frames}, {used}, {how}"
            print(f"{label_clip:<9}{label:<34}{t*1e3:8.0f}{t_min*1e3:8.0f}{n:8d}{t/base:15.2f}")


if __name__ == "__main__":
    main()
