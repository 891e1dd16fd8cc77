"""What a worker keeps resident between jobs, with and without returning the C heap's free pages
(worker/heap.py), side by side in one run.

    python bench/bench_heap.py [--jobs 4] [--height 1080] [--frames 32]

Each job moderates the same face clip with the default model, as a worker's job does; after each,
"kept" is the resident set glibc keeps and "trimmed" what is left once `release_free_memory` has
run (the worker runs it after every job), with the time the trim took.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.clips import face_clip  # noqa: E402
from worker.heap import release_free_memory, resident_bytes  # noqa: E402
from worker.pipeline import Moderator  # noqa: E402
from worker.settings import Settings  # noqa: E402

MB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--frames", type=int, default=32)
    args = ap.parse_args()
    if resident_bytes() is None:
        print("no /proc/self/statm here: nothing to measure", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        clip = face_clip(Path(tmp) / "clip.mp4", seconds=10.0, height=args.height)
        moderator = Moderator(Settings(log_format="json"))
        loaded = resident_bytes() / MB
        kept, trimmed, took = [], [], []
        for _ in range(args.jobs):
            verdict = moderator.moderate_path(clip, frames=args.frames)
            assert verdict["status"] == "ok", verdict.get("error")
            kept.append(resident_bytes() / MB)
            t0 = time.perf_counter()
            if not release_free_memory():
                print("this C library has no malloc_trim: nothing to compare", file=sys.stderr)
                return 2
            took.append((time.perf_counter() - t0) * 1000)
            trimmed.append(resident_bytes() / MB)
    print(f"{args.height}p, {args.frames} frames, {args.jobs} jobs; resident after loading the model: {loaded:.0f} MB")
    print(f"{'job':>4} {'kept MB':>9} {'trimmed MB':>11} {'returned MB':>12} {'trim ms':>8}")
    for i, (k, t, ms) in enumerate(zip(kept, trimmed, took), 1):
        print(f"{i:>4} {k:>9.0f} {t:>11.0f} {k - t:>12.0f} {ms:>8.1f}")
    print(f"median: kept {statistics.median(kept):.0f} MB, trimmed {statistics.median(trimmed):.0f} MB "
          f"({statistics.median(trimmed) / statistics.median(kept):.2f}x), trim {statistics.median(took):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
