"""What bringing HDR to SDR costs the decoder: the same 10 s face clip as 10-bit HEVC, tagged SDR
BT.709, HLG and PQ BT.2020, sampled as a job samples it, side by side in one run.

    python bench/bench_hdr.py [--frames 32] [--repeat 3] [--height 720]

HLG and PQ frames go through swscale's colour management (worker/frames.py), whose reformatters
set themselves up for a frame size and are then kept for the process: "first" is a worker's first
job of that kind, "after" the median of the jobs that follow it. Each job decodes in a thread of
its own, as the worker's (worker/prefetch.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.clips import face_clip  # noqa: E402
from worker.decode import Limits, VideoReader  # noqa: E402

LIMITS = Limits(max_duration_s=3600, max_pixels=4096 * 4096, decode_timeout_s=600)


def sampled_s(path: Path, n: int) -> float:
    t0 = time.perf_counter()
    with VideoReader(str(path), LIMITS) as reader:
        frames = list(reader.sample(n))
    assert len(frames) == n, len(frames)
    return time.perf_counter() - t0


def in_new_thread(path: Path, n: int) -> float:
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(sampled_s(path, n)))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--height", type=int, default=720)
    args = ap.parse_args()
    print(f"sample {args.frames} frames of a {args.height}p 10 s clip; 'after': median of {args.repeat} runs")
    print(f"{'transfer':<10}{'first ms':>10}{'after ms':>10}{'first vs sdr':>14}{'after vs sdr':>14}")
    base = None
    for transfer in ("sdr", "hlg", "pq"):
        clip = face_clip(Path(tempfile.gettempdir()) / f"deepfake-bench-{args.height}p-{transfer}.mp4",
                         height=args.height, transfer=transfer)
        first = in_new_thread(clip, args.frames)
        after = statistics.median(in_new_thread(clip, args.frames) for _ in range(args.repeat))
        base = base or (first, after)
        print(f"{transfer:<10}{first * 1e3:10.0f}{after * 1e3:10.0f}{first / base[0]:14.2f}{after / base[1]:14.2f}")


if __name__ == "__main__":
    main()
