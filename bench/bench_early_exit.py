"""Early exit (DEEPFAKE_EARLY_EXIT_FRAMES) on real and fake clips: time saved and verdicts changed.

    python bench/bench_early_exit.py [--k 8] [--margin 0.3]

Scores each clip with the packaged demo model twice, early exit off and on, and prints the time of
each, the frames sampled, and whether the label changed. Real clips: the carphone clip, the same
re-encoded (VP9, MJPEG, rotated), the 2×2 tiled four-face clip, and the 10 s 720p bench clip. Fake
clips: self-blended fakes (the demo model's kind) of the carphone frames it held out (100-119), of
all its frames, and of the tiled clip (one face of four), each frame blended afresh.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.clips import face_clip, self_blended_clip  # noqa: E402
from media import build_corpus, carphone_frames, encode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--margin", type=float, default=0.3)
    args = ap.parse_args()
    from worker.logging import configure_logging
    from worker.pipeline import Moderator
    from worker.settings import Settings

    tmp = Path(tempfile.mkdtemp())
    corpus = build_corpus(tmp / "corpus")
    tiled = encode(tmp / "tiled.mp4", [np.concatenate([np.concatenate([f, f[:, ::-1]], 1),
                                                       np.concatenate([f[:, ::-1], f], 1)]) for f in carphone_frames()[::4]],
                   rate=8)
    clips = {"carphone": corpus["carphone"], "vp9": corpus["vp9_webm"], "mjpeg": corpus["mjpeg_avi"],
             "rotated": corpus["rotated_mp4"], "tiled 2x2": tiled,
             "720p 10 s": face_clip(Path(tempfile.gettempdir()) / "deepfake-bench-720p-1slice.mp4", height=720)}
    base = Settings(log_format="json", log_level="ERROR")
    configure_logging(base.log_format, base.log_level)  # the table only
    off = Moderator(base)
    frames = carphone_frames()
    tiles = [np.concatenate([np.concatenate([f, f[:, ::-1]], 1), np.concatenate([f[:, ::-1], f], 1)]) for f in frames[::4]]
    fakes = {"fake held-out": self_blended_clip(tmp / "fake-heldout.mp4", frames[100:], off.detector, seed=1),
             "fake carphone": self_blended_clip(tmp / "fake-all.mp4", frames[::2], off.detector, seed=2),
             "fake tiled": self_blended_clip(tmp / "fake-tiled.mp4", tiles, off.detector, seed=3)}
    truth = {**{name: "real" for name in clips}, **{name: "fake" for name in fakes}}
    clips.update(fakes)
    on = Moderator(base.model_copy(update={"early_exit_frames": args.k, "early_exit_margin": args.margin}),
                   detector=off.detector, engine=off.engine)
    off.moderate_path(clips["carphone"])  # warm-up
    print(f"demo model {off.model_block['name']}, threshold {off.threshold:.3f}, early exit after {args.k} frames "
          f"at margin {args.margin}")
    print(f"{'clip':<15}{'truth':>6}{'off s':>7}{'on s':>7}{'saved':>7}{'frames':>8}  label off → on")
    total_off = total_on = changed = 0
    right = {"off": 0, "on": 0}
    for name, clip in clips.items():
        t0 = time.perf_counter()
        a = off.moderate_path(clip)
        t1 = time.perf_counter()
        b = on.moderate_path(clip)
        t2 = time.perf_counter()
        total_off += t1 - t0
        total_on += t2 - t1
        changed += a["label"] != b["label"]
        right["off"] += a["label"] == truth[name]
        right["on"] += b["label"] == truth[name]
        print(f"{name:<15}{truth[name]:>6}{t1 - t0:7.2f}{t2 - t1:7.2f}{1 - (t2 - t1) / (t1 - t0):7.0%}"
              f"{b['video']['frames_sampled']:>4}/{a['video']['frames_sampled']:<3}  {a['label']} → {b['label']}"
              f"  (scores {a['score']:.3f} → {b['score']:.3f})")
    print(f"total: {total_off:.2f} s → {total_on:.2f} s ({1 - total_on / total_off:.0%} saved); "
          f"{changed} of {len(clips)} labels changed; right {right['off']} → {right['on']} of {len(clips)}")


if __name__ == "__main__":
    main()
