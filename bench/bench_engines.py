"""Throughput of the model engines on the same input: crops/s, ratio to PyTorch eager, peak RSS.

    python bench/bench_engines.py                       # mdcsd_tiny and full-width mdcsd, batch 8
    python bench/bench_engines.py --models mdcsd --full-passes 6
    python bench/bench_engines.py --engines pytorch,onnxruntime,onnxruntime-iobind,onnxruntime-mempattern

Not a test. Weights are random (seeded): speed does not depend on their values, the scores mean
nothing. Model directories (weights.pt + model.onnx + card, written by training.export; ~1 min for
both the first time) are kept in --workdir and reused.

How it measures, so that other jobs on a shared machine bias no engine:

* Speed: one child process per model loads every engine, warms each with one pass, then runs
  --*-passes rounds; in each round every engine scores the same --*-crops seeded image-like crops
  once (the order rotates per round) and a 2048³ fp32 torch.mm is timed too (the rate the machine
  gives right then, "mm now"). Reported: median crops/s per engine, its slowest–fastest pass, and
  the ratio to PyTorch eager as the median of per-round ratios (adjacent passes share the load).
* Memory: one child process per (model, engine) loads it and scores two passes: its own peak RSS
  (ru_maxrss: interpreter + libraries + model + activations) and its RSS after loading.
* GFLOP per crop: torch.utils.flop_counter on the PyTorch model (multiply-add = 2 FLOPs);
  achieved GFLOP/s = crops/s × that.

Engines: pytorch (CPU eager fp32), onnxruntime (CPU provider), onnxruntime-int8 (the graph statically
quantised, calibrated on the bench crops), onnxruntime-iobind (IO binding), onnxruntime-mempattern
(ORT's memory pattern on), and on a CUDA machine pytorch-cuda,
pytorch-cuda-bf16 (channels-last + CUDA graphs) and tensorrt.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENGINE_SPECS: dict[str, dict] = {
    "pytorch": {"backend": "pytorch"},
    "onnxruntime": {"backend": "onnxruntime"},
    "onnxruntime-iobind": {"backend": "onnxruntime", "io_binding": True},
    "onnxruntime-mempattern": {"backend": "onnxruntime", "mem_pattern": True},
    "onnxruntime-int8": {"backend": "onnxruntime", "precision": "int8", "calibrate": True},
    "pytorch-cuda": {"backend": "pytorch", "device": "cuda"},
    "pytorch-cuda-bf16": {"backend": "pytorch", "device": "cuda", "precision": "bf16", "channels_last": True,
                          "cuda_graphs": True},
    "tensorrt": {"backend": "tensorrt", "device": "cuda"},
}


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- children -------------------------------------------------------------------------------------------

def matmul_gflops(threads: int, reps: int = 3, n: int = 2048) -> float:
    """Best-of-`reps` fp32 n³ torch.mm rate on `threads` threads: what the machine gives right now."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_crop(model_dir: Path) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training.models import create_model
    from worker.engine.model_card import ModelCard

    card = ModelCard.load(model_dir)
    model = create_model(card.architecture, **card.architecture_kwargs).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, card.input_size, card.input_size))
    return counter.get_total_flops() / 1e9


def make_engine(model_dir: Path, spec_name: str, batch: int):  # type: ignore[no-untyped-def]
    spec = dict(ENGINE_SPECS[spec_name])
    if spec.pop("calibrate", False):  # INT8: calibrated on the bench's crops, cached beside the models
        from worker.engine.model_card import ModelCard

        spec["calibration"] = bench_crops(ModelCard.load(model_dir).input_size, 16)
        spec["cache_dir"] = Path(model_dir).parent / "engine-cache"
    ort_options = {k: spec.pop(k) for k in ("io_binding", "mem_pattern") if k in spec}
    if ort_options:  # variants load_engine has no switch for
        from worker.engine.onnx_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_dir, batch_size=batch, **ort_options)
    from worker.engine import load_engine

    return load_engine(model_dir, batch_size=batch, **spec)


def bench_crops(size: int, n: int, seed: int = 0):  # type: ignore[no-untyped-def]
    import numpy as np

    from training.export import parity_inputs

    return np.resize(parity_inputs(size, n=min(n, 16), seed=seed), (n, size, size, 3))


def child_memory(model_dir: str, spec_name: str, batch: int, crops_n: int) -> dict:
    import torch  # noqa: F401 - the worker always has torch loaded (the face detector): count it for every engine

    rss0 = rss_mib()
    t = time.perf_counter()
    engine = make_engine(Path(model_dir), spec_name, batch)
    load_s = time.perf_counter() - t
    rss_loaded = rss_mib()
    crops = bench_crops(engine.card.input_size, crops_n)
    for _ in range(2):  # ORT allocates its memory-pattern block from the second run on
        engine.predict(crops)
    return {"backend": engine.backend, "load_s": load_s, "rss_before_mib": rss0, "rss_loaded_mib": rss_loaded,
            "peak_rss_mib": peak_rss_mib()}


def child_speed(model_dir: str, engines: list[str], batch: int, crops_n: int, passes: int, threads: int) -> dict:
    model_dir_p = Path(model_dir)
    loaded = {e: make_engine(model_dir_p, e, batch) for e in engines}
    size = next(iter(loaded.values())).card.input_size
    crops = bench_crops(size, crops_n)
    for eng in loaded.values():
        eng.predict(crops)  # warm-up: ORT arena, oneDNN primitives, cuDNN choice, CUDA graphs
    times: dict[str, list[float]] = {e: [] for e in engines}
    mm: list[float] = []
    for r in range(passes):
        order = engines[r % len(engines):] + engines[: r % len(engines)]
        for e in order:
            t = time.perf_counter()
            loaded[e].predict(crops)
            times[e].append(time.perf_counter() - t)
        mm.append(matmul_gflops(threads, reps=1))
    out: dict = {"engines": {}, "matmul_gflops_per_round": mm, "crops_per_pass": crops_n, "passes": passes,
                 "batch_size": batch}
    for e in engines:
        rates = [crops_n / s for s in times[e]]
        out["engines"][e] = {"backend": loaded[e].backend, "crops_s": statistics.median(rates),
                             "crops_s_worst": min(rates), "crops_s_best": max(rates), "rates": rates}
        if "pytorch" in times:
            ratios = [a / b for a, b in zip(times["pytorch"], times[e])]  # per round: t_eager / t_engine
            out["engines"][e].update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    if "pytorch" in engines:
        out["gflop_per_crop"] = flops_per_crop(model_dir_p)
    return out


def run_child(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"kind": kind, **kwargs})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": ((proc.stderr or proc.stdout).strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- parent ---------------------------------------------------------------------------------------------

def ensure_model_dir(workdir: Path, architecture: str) -> Path:
    from worker.engine.model_card import ModelCard

    out = workdir / architecture
    try:
        card = ModelCard.load(out)
        if card.files.get("onnx") and (out / card.files["onnx"]).is_file():
            return out
    except FileNotFoundError:
        pass
    import torch

    from training.export import export_model_dir
    from training.models import create_model

    print(f"# exporting {architecture} (random weights, seed 0) to {out} …", flush=True)
    torch.manual_seed(0)
    export_model_dir(create_model(architecture), out, name=f"{architecture}-random", version="0.0.0-bench",
                     trained=False, training_data="none: random weights for benchmarking", parity_batch_sizes=(1, 2))
    return out


def available_specs() -> list[str]:
    specs = ["pytorch", "onnxruntime", "onnxruntime-int8"]
    try:
        import torch

        if torch.cuda.is_available():
            specs += ["pytorch-cuda", "pytorch-cuda-bf16"]
            from worker.engine.tensorrt_engine import tensorrt_available

            if tensorrt_available():
                specs.append("tensorrt")
    except Exception:
        pass
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--models", default="mdcsd_tiny,mdcsd")
    p.add_argument("--engines", default=None, help="comma-separated; default: every one available here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tiny-crops", type=int, default=32, help="crops per timed pass, mdcsd_tiny")
    p.add_argument("--tiny-passes", type=int, default=6)
    p.add_argument("--full-crops", type=int, default=8, help="crops per timed pass, full-width models")
    p.add_argument("--full-passes", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the per-engine peak-RSS children")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the matmul reference; default: the CPU quota (what the engines use)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("DEEPFAKE_BENCH_DIR", "/tmp/deepfake-bench")))
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    args = p.parse_args(argv)

    if args.child:
        job = json.loads(args.child)
        kind = job.pop("kind")
        print(json.dumps(child_speed(**job) if kind == "speed" else child_memory(**job)))
        return 0

    from worker.engine.onnx_engine import available_cpus

    threads = args.threads or available_cpus()
    engines = args.engines.split(",") if args.engines else available_specs()
    unknown = [e for e in engines if e not in ENGINE_SPECS]
    if unknown:
        p.error(f"unknown engines {unknown}; known: {', '.join(ENGINE_SPECS)}")
    started = time.perf_counter()
    load = os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus (quota/affinity): {threads}  "
          f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    report: dict = {"threads": threads, "load_average_start": load, "models": {}}
    for arch in args.models.split(","):
        model_dir = ensure_model_dir(args.workdir, arch)
        tiny = "tiny" in arch
        crops_n, passes = (args.tiny_crops, args.tiny_passes) if tiny else (args.full_crops, args.full_passes)
        speed = run_child("speed", model_dir=str(model_dir), engines=engines, batch=args.batch_size,
                          crops_n=crops_n, passes=passes, threads=threads)
        memory = {} if args.no_memory else {
            e: run_child("memory", model_dir=str(model_dir), spec_name=e, batch=args.batch_size, crops_n=args.batch_size)
            for e in engines}
        report["models"][arch] = {"speed": speed, "memory": memory}
        if "error" in speed:
            print(f"\n## {arch}: failed: {speed['error']}")
            continue
        gflop = speed.get("gflop_per_crop")
        mm = speed["matmul_gflops_per_round"]
        print(f"\n## {arch}  batch {args.batch_size}, {crops_n} crops × {passes} interleaved passes"
              + (f", {gflop:.2f} GFLOP/crop" if gflop else "")
              + f"; mm now {min(mm):.0f}–{max(mm):.0f} GFLOP/s")
        print(f"{'engine':<23} {'crops/s':>8} {'range':>15} {'× eager':>8} {'ratio range':>12} {'GFLOP/s':>8} "
              f"{'load MiB':>9} {'peak RSS MiB':>13}")
        for e in engines:
            r = speed["engines"][e]
            rng = f"{r['crops_s_worst']:.2f}–{r['crops_s_best']:.2f}"
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            rrng = f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}" if "ratio" in r else "-"
            gfs = f"{r['crops_s'] * gflop:.1f}" if gflop else "-"
            m = memory.get(e, {})
            rss_l = f"{m['rss_loaded_mib']:.0f}" if "rss_loaded_mib" in m else "-"
            rss_p = f"{m['peak_rss_mib']:.0f}" if "peak_rss_mib" in m else "-"
            print(f"{e:<23} {r['crops_s']:>8.2f} {rng:>15} {ratio:>8} {rrng:>12} {gfs:>8} {rss_l:>9} {rss_p:>13}")
    load = os.getloadavg()
    print(f"\n# total {time.perf_counter() - started:.0f} s, load average now {load[0]:.2f}; "
          "weights random (seed 0): speed only, scores meaningless")
    print("# crops/s: median pass; range: slowest–fastest pass; × eager: median of per-round time ratios to "
          "pytorch; GFLOP/s = crops/s × GFLOP/crop; mm now: fp32 2048³ torch.mm GFLOP/s, timed each round; "
          f"RSS: one child per engine (torch imported in each), loaded + two passes of {args.batch_size} crops")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
