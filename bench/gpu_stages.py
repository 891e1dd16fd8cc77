"""The GPU check's stages that run through the worker's own code (bench/gpu_verify.py runs them as
sections): fast sampled decoding with slice vs frame threads, RetinaFace alone, and the whole
pipeline in worker processes sharing the device against decode-only processes on all cores."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def decode_threading(clips: dict, thread_counts=(1, 4, 16), repeat: int = 3):
    """Fast sampling (non-reference frames skipped) with the threads chosen by the stream's slices (the
    default: frame threads for one-slice H.264, slice threads otherwise), and with slice and frame
    threads forced: on 2 cores the choice was right (bench/README.md); does it hold with 16?"""
    import statistics

    from worker.decode import Limits, VideoReader

    class SliceThreaded(VideoReader):
        FAST_PASS_THREADING = "SLICE"

    class FrameThreaded(VideoReader):
        FAST_PASS_THREADING = "FRAME"

    def timed(cls, clip, threads):
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with cls(clip, Limits(3600, 4096 * 4096, 600), threads=threads) as r:
                n = len(list(r.sample(32, mode="fast")))
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1000, 1), n

    out: dict = {}
    for name, clip in clips.items():
        for threads in thread_counts:
            for label, cls in (("chosen", VideoReader), ("slice", SliceThreaded), ("frame", FrameThreaded)):
                out[f"{name}_fast_{label}_threads{threads}_ms"] = timed(cls, clip, threads)[0]
    return out


def detect(clips: dict, device: str, batches=(8, 32)):
    """RetinaFace alone on each clip's 32 sampled frames: where a detection pass spends its time."""
    import numpy as np
    import torch

    from worker.decode import Limits, VideoReader
    from worker.faces.detector import RetinaFaceDetector

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    det = RetinaFaceDetector(device=device)
    out: dict = {}
    for name, clip in clips.items():
        with VideoReader(clip, Limits(3600, 4096 * 4096, 600)) as reader:
            frames = np.stack([f.image for f in reader.sample(32, mode="fast")])
        det.detect(frames[:8])  # warm-up (cuDNN autotune, allocator)
        for batch in batches:
            parts = {"preprocess": 0.0, "network": 0.0, "decode_select": 0.0}
            faces = 0
            t_all = time.perf_counter()
            for i in range(0, len(frames), batch):
                chunk = frames[i:i + batch]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    images = det.preprocess(chunk)
                    sync()
                    t1 = time.perf_counter()
                    det.model(images)
                    sync()
                    t2 = time.perf_counter()
                faces += sum(len(f) for f in det.detect(chunk))  # the whole call, for the remainder
                sync()
                t3 = time.perf_counter()
                parts["preprocess"] += t1 - t0
                parts["network"] += t2 - t1
                parts["decode_select"] += max(0.0, (t3 - t2) - (t2 - t0))  # detect() minus its own pre+net
            total = time.perf_counter() - t_all
            layouts = {}
            with torch.inference_mode():
                x = det.preprocess(frames[:batch])
                for label, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                    xi = x.contiguous(memory_format=fmt)
                    det.model(xi)  # warm-up for this layout
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(5):
                        det.model(xi)
                    sync()
                    layouts[f"network_{label}_ms_per_batch"] = round((time.perf_counter() - t0) / 5 * 1000, 2)
            out[f"{name}@{batch}"] = {"frames": len(frames), "faces": faces, "detector_layout": str(det.memory_format),
                                      **layouts,
                                      "ms_per_32_frames_detect_only": round(sum(parts.values()) * 1000, 1),
                                      "ms_wall_incl_instrumentation": round(total * 1000, 1),
                                      **{f"{k}_ms": round(v * 1000, 1) for k, v in parts.items()}}
    return out


def _pipeline_proc(rank, clip, model_dir, jobs, device, barrier, queue):
    sys.path.insert(0, str(ROOT))
    import resource

    import torch

    from worker.pipeline import Moderator
    from worker.settings import Settings

    share = max(1, (os.cpu_count() or 4) // 4)  # a quarter of the cores each, as a pod's requests.cpu gives
    torch.set_num_threads(share)
    settings = Settings(model_dir=model_dir, device=device, frames=32, log_format="json", log_level="WARNING",
                        precision="fp16" if device.startswith("cuda") else None, decode_threads=share,
                        engine_threads=share)
    m = Moderator(settings)
    m.moderate_path(clip)  # warm-up
    barrier.wait()
    t0 = time.perf_counter()
    stages: dict = {}
    for _ in range(jobs):
        v = m.moderate_path(clip)
        for k, ms in v["timings_ms"].items():
            stages.setdefault(k, []).append(ms)
    wall = time.perf_counter() - t0
    mem = {}
    if device.startswith("cuda"):
        mem = {"cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
               "cuda_max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    queue.put({"rank": rank, "wall_s": wall, "jobs": jobs, "status": v["status"],
               "frames_with_face": v["video"]["frames_with_face"],
               "stage_ms_median": {k: sorted(x)[len(x) // 2] for k, x in stages.items()},
               "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **mem})


def _decode_proc(clip, n, queue):
    sys.path.insert(0, str(ROOT))
    from worker.decode import Limits, VideoReader

    t0 = time.perf_counter()
    for _ in range(n):
        with VideoReader(clip, Limits(3600, 4096 * 4096, 600), threads=1) as r:
            list(r.sample(32, mode="fast"))
    queue.put(time.perf_counter() - t0)


def pipeline(clips: dict, model_dir: str, device: str, deadline: float, workers_list=(1, 4), cpus: int | None = None,
             progress: Callable[[dict], None] = lambda partial: None, jobs: int | None = None,
             decodes: int = 4) -> dict:
    """Videos/s of the whole pipeline in `workers_list` worker processes sharing the device (each
    scoring `jobs` videos: default 6 alone, 4 side by side), against decode-only on `cpus` processes
    (`decodes` each); `progress` gets the figures so far after each run."""
    ctx = mp.get_context("spawn")
    out: dict = {}
    cpus = cpus or os.cpu_count() or 16
    for name, clip in clips.items():
        if time.time() > deadline:
            out[name] = "skipped: time"
            continue
        q = ctx.Queue()
        n_dec = decodes
        procs = [ctx.Process(target=_decode_proc, args=(clip, n_dec, q)) for _ in range(cpus)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        out[f"{name}_decode_only_videos_per_s"] = round(cpus * n_dec / (time.perf_counter() - t0), 2)
        progress(out)
        for workers in workers_list:
            if time.time() > deadline:
                continue
            barrier = ctx.Barrier(workers)
            q = ctx.Queue()
            n_jobs = jobs or (6 if workers == 1 else 4)
            procs = [ctx.Process(target=_pipeline_proc, args=(r, clip, model_dir, n_jobs, device, barrier, q))
                     for r in range(workers)]
            for p in procs:
                p.start()
            results = [q.get(timeout=300) for _ in procs]
            for p in procs:
                p.join()
            wall = max(r["wall_s"] for r in results)
            out[f"{name}_pipeline_{workers}w"] = {
                "videos_per_s": round(sum(r["jobs"] for r in results) / wall, 2), "per_worker": results}
            progress(out)
    return out
