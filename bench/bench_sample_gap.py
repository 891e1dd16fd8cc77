"""What DEEPFAKE_MAX_SAMPLE_GAP_S costs on a long video: one clip, sampling gaps side by side.

    python bench/bench_sample_gap.py [--minutes 10] [--repeat 2] [--model-dir DIR]

Not a test. A long 640×360 clip (the carphone face looped on a canvas, 24 fps, x264) is scored by the
whole pipeline with the gap off (DEEPFAKE_FRAMES = 32 evenly) and at 20, 10 and 5 s; it prints
frames sampled, seconds per video, the stages, and the ratio to the gap off. Decoding the long video
costs about the same whichever frames are kept (B-frames are skipped either way); detection, crops
and the model grow with the frames.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GAPS = (0.0, 20.0, 10.0, 5.0)


def long_clip(path: Path, minutes: float, fps: int = 24) -> Path:
    """Encoded frame by frame (never held in memory); built once and kept in the temp folder."""
    if path.exists():
        return path
    import av
    import cv2
    import numpy as np
    from media import carphone_frames

    source = carphone_frames()
    loop = [cv2.resize(f, (440, 360), interpolation=cv2.INTER_CUBIC) for f in source + source[::-1]]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "x264-params": "sliced-threads=0"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        canvas = np.full((360, 640, 3), 40, np.uint8)
        for i in range(int(minutes * 60 * fps)):
            canvas[:, 100:540] = loop[i % len(loop)]
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None, help="default: the packaged demo model")
    args = ap.parse_args()

    from worker.pipeline import Moderator
    from worker.settings import Settings

    print(f"building a {args.minutes:g} min clip (once) ...", file=sys.stderr)
    clip = long_clip(Path(tempfile.gettempdir()) / f"deepfake-bench-{args.minutes:g}min-360p.mp4", args.minutes)
    base = Settings(model_dir=args.model_dir, frames=32, log_format="json", log_level="ERROR")
    first = Moderator(base.model_copy(update={"max_sample_gap_s": 0.0}))
    first.moderate_path(clip)  # warm-up
    configs = {gap: Moderator(base.model_copy(update={"max_sample_gap_s": gap}), detector=first.detector,
                              engine=first.engine) for gap in GAPS}
    times: dict = {gap: [] for gap in GAPS}
    last: dict = {}
    for _ in range(args.repeat):  # rounds interleave the gaps, so load changes hit all alike
        for gap, m in configs.items():
            t0 = time.perf_counter()
            last[gap] = m.moderate_path(clip)
            times[gap].append(time.perf_counter() - t0)
    base_s = statistics.median(times[0.0])
    print(f"clip: {clip.name} ({args.minutes:g} min, 640x360, 24 fps); model {first.engine.card.name} on "
          f"{first.engine.backend}; median of {args.repeat}")
    print(f"{'gap':<8}{'frames':>7}{'s/video':>9}{'× off':>7}   stages (ms)")
    for gap in GAPS:
        v, t = last[gap], statistics.median(times[gap])
        stages = ", ".join(f"{k} {x:.0f}" for k, x in v["timings_ms"].items() if k != "total")
        label = "off" if gap == 0 else f"{gap:g} s"
        print(f"{label:<8}{v['video']['frames_sampled']:>7}{t:9.2f}{t / base_s:7.2f}   {stages}")


if __name__ == "__main__":
    main()
