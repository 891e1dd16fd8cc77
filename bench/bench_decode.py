"""Sampled decode vs decode-all on a 10 s 720p H.264 clip, side by side in one run.

    python bench/bench_decode.py [--frames 32] [--repeat 5] [--height 720]
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


def decode_all(path: Path) -> int:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return sum(1 for _ in c.decode(s))


def sampled(path: Path, n: int, mode: str) -> tuple[int, str]:
    with VideoReader(str(path), LIMITS) as r:
        frames = list(r.sample(n, mode=mode))
        return len(frames), r.info.sampling


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
    clip = face_clip(Path(tempfile.gettempdir()) / f"deepfake-bench-{args.height}p.mp4", height=args.height)
    base, base_min, total = timed(lambda: decode_all(clip), args.repeat)
    print(f"clip: {clip.name}, {total} frames; median of {args.repeat} runs")
    print(f"{'method':<34}{'ms':>8}{'min ms':>8}{'frames':>8}{'vs decode-all':>15}")
    print(f"{'decode all (PyAV, threaded)':<34}{base*1e3:8.0f}{base_min*1e3:8.0f}{total:8d}{1.0:15.2f}")
    for mode in ("exact", "fast"):
        t, t_min, (n, used) = timed(lambda: sampled(clip, args.frames, mode), args.repeat)
        label = f"sample {args.frames}, mode={mode} ({used})"
        print(f"{label:<34}{t*1e3:8.0f}{t_min*1e3:8.0f}{n:8d}{t/base:15.2f}")


if __name__ == "__main__":
    main()
