"""Whole pipeline vs model only, on the same 10 s 720p clip at 32 frames, plus the worker's peak RSS.

    python bench/bench_pipeline.py [--arch mdcsd] [--engine onnxruntime] [--repeat 2]

Not a test. Prints, side by side: the worker's whole-pipeline time per video (decode → RetinaFace →
crops → model → verdict; overlap off and on; with a model in shadow), the model alone on that video's
own crops, their ratio, and the process's peak RSS. Weights are random (seeded): speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engines import ensure_model_dir  # noqa: E402
from bench.clips import face_clip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mdcsd")
    ap.add_argument("--engine", default="onnxruntime")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import numpy as np

    from worker.pipeline import Moderator
    from worker.settings import Settings

    clip = face_clip(Path(tempfile.gettempdir()) / "deepfake-bench-720p-1slice.mp4", height=720)
    model_dir = ensure_model_dir(Path(os.environ.get("DEEPFAKE_BENCH_DIR", "/tmp/deepfake-bench")), args.arch)
    base = Settings(model_dir=model_dir, engine=args.engine, frames=args.frames, log_format="json", log_level="ERROR")
    moderator = Moderator(base)
    moderator.moderate_path(clip, report_dir=None)  # warm-up
    configs = {  # rounds interleave the configurations, so load changes hit both alike
        f"pipeline, overlap {overlap}": Moderator(base.model_copy(update={"overlap": overlap}),
                                                  detector=moderator.detector, engine=moderator.engine)
        for overlap in ("off", "on")
    }
    # A model in shadow (DEEPFAKE_SHADOW_MODEL_DIR), here the same weights: its price is a second model pass.
    configs["pipeline + shadow, off"] = Moderator(base.model_copy(update={"overlap": "off"}), detector=moderator.detector,
                                                  engine=moderator.engine, shadow_engine=moderator.engine)
    times: dict = {k: [] for k in configs}
    stages: dict = {}
    for _ in range(args.repeat):
        for name, m in configs.items():
            t0 = time.perf_counter()
            v = m.moderate_path(clip)
            times[name].append(time.perf_counter() - t0)
            stages[name] = v["timings_ms"]
    rows = [(name, statistics.median(times[name]), stages[name]) for name in configs]
    # The model alone on this video's own crops (what the pipeline fed it).
    from worker.decode import Limits, VideoReader
    from worker.preprocess import crop_face

    with VideoReader(str(clip), Limits(3600, 4096 * 4096, 600)) as reader:
        frames = [f.image for f in reader.sample(args.frames)]
    found = moderator.detector.detect(np.stack(frames))
    batch = np.stack([crop_face(f, max(fs, key=lambda x: x.area).box, moderator.recipe.size, moderator.recipe.scale)
                      for f, fs in zip(frames, found) if fs])
    model_times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        moderator.engine.predict(batch)
        model_times.append(time.perf_counter() - t0)
    model_s = statistics.median(model_times)
    print(f"clip: {clip.name} (10 s, 720p), {args.frames} frames, {len(batch)} crops; {args.arch} on "
          f"{moderator.engine.backend}; median of {args.repeat}")
    print(f"{'':<26}{'s/video':>9}{'× model':>9}   stages (ms)")
    print(f"{'model only':<26}{model_s:9.2f}{1.0:9.2f}")
    for name, t, st in rows:
        print(f"{name:<26}{t:9.2f}{t / model_s:9.2f}   " + ", ".join(f"{k} {v:.0f}" for k, v in st.items()))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
