"""The GPU check (issue: verify the GPU path on an NVIDIA H200), as one bounded run.

    python bench/gpu_verify.py --out DIR [--budget-s 240] [--sections parity,throughput,detect,pipeline]

Writes DIR/gpu_verify.json (and prints a summary) with:
1. parity: CUDA fp32 / TF32 / bf16 / fp16 probabilities against the same model on the CPU, on real
   face crops (the trained demo model, and full-width MD-CSDNetwork with BatchNorm statistics set
   from real crops so its outputs spread);
2. model throughput, crops/s at batch 1, 32, 128, 256 for eager fp32, bf16 and fp16 autocast, with
   channels-last, torch.compile and CUDA graphs, with the fraction of the bf16 bound reached;
3. fast sampled decoding with slice vs frame threads at 1, 4 and 16 threads; RetinaFace alone on
   each clip's 32 frames: preprocess, network, box decoding + NMS;
4. the whole pipeline (decode → RetinaFace → crops → model) on 10 s 720p and 1080p clips at 32
   frames, in 1 and 4 worker processes, against decode-only videos/s on all cores;
5. GPU memory per worker.
Each section is time-boxed and failure-isolated: a broken section records its error and the rest run.
Sections 3 and 4 live in bench/gpu_stages.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import gpu_stages  # noqa: E402 - after ROOT is on the path (run as a script)

BF16_TFLOPS = 790e12  # measured bf16 matmul rate on this kind of machine
GFLOP_PER_CROP = 33.75e9  # full-width MD-CSDNetwork at 299×299: torch.utils.flop_counter on create_model("mdcsd")
RESULTS: dict = {}
OUT: Path = Path(".")
CLIPS = ROOT / ".gpu"
DEV = "cuda"  # --dry-run: "cpu", to check the script here before spending device time
ARCH = "mdcsd"


def save() -> None:
    (OUT / "gpu_verify.json").write_text(json.dumps(RESULTS, indent=1))


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            try:
                RESULTS[name] = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - record and go on
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            RESULTS.setdefault("section_s", {})[name] = round(time.time() - t0, 1)
            print(f"== {name} ({time.time() - t0:.1f} s)", json.dumps(RESULTS[name])[:1500], flush=True)
            save()
        return run
    return wrap


def real_crops(n: int = 32, clip: Path | None = None):
    """Largest-face 299² crops from the real carphone face (the 720p bench clip), found by the project's
    detector on the device."""
    import numpy as np

    from worker.decode import Limits, VideoReader
    from worker.faces import create_detector
    from worker.preprocess import crop_face, crops_to_tensor_layout

    with VideoReader(str(clip or CLIPS / "clip720p.mp4"), Limits(3600, 4096 * 4096, 600)) as reader:
        frames = [f.image for f in reader.sample(n, mode="exact")]
    det = create_detector("retinaface-mobilenet", device=DEV)
    found = det.detect(np.stack(frames))
    crops = [crop_face(f, max(fs, key=lambda x: x.area).box) for f, fs in zip(frames, found) if fs]
    return crops_to_tensor_layout(np.stack(crops))


def calibrated_full_model(x):
    """Full-width MD-CSDNetwork with BatchNorm statistics from real crops and a stretched classifier."""
    import torch

    from training.models import create_model

    torch.manual_seed(0)
    model = create_model(ARCH)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        model(torch.from_numpy(x[:16]))
        model.eval()
        logits = model(torch.from_numpy(x[:16]))
        spread = float((logits[:, 1] - logits[:, 0]).std())
        head = model.classifier if hasattr(model, "classifier") else None
        if head is not None and spread > 0:
            head.weight.mul_(2.0 / spread)
    return model.eval()


@section("environment")
def environment():
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "cpus": os.cpu_count(),
            "cudnn": torch.backends.cudnn.version()}


@section("parity")
def parity():
    import torch

    from worker.pipeline import DEFAULT_MODEL_DIR

    x = real_crops(32)
    out = {"crops": int(len(x))}
    models = {f"{ARCH}_calibrated": calibrated_full_model(x)}
    if (DEFAULT_MODEL_DIR / "model.json").exists():
        from worker.engine.model_card import ModelCard
        from training.models import create_model

        card = ModelCard.load(DEFAULT_MODEL_DIR)
        m = create_model(card.architecture, **card.architecture_kwargs)
        m.load_state_dict(torch.load(DEFAULT_MODEL_DIR / card.files["weights"], map_location="cpu", weights_only=True))
        models["demo_" + card.name] = m.eval()
    x299 = torch.from_numpy(x)
    for name, model in models.items():
        size = getattr(model, "input_size", 299)  # the demo model takes 128-px crops: the same faces, resized
        xt = x299 if size == 299 else torch.nn.functional.interpolate(x299, size=(size, size), mode="bilinear",
                                                                       antialias=True, align_corners=False)
        with torch.inference_mode():
            ref = torch.softmax(model.float().cpu()(xt), 1)[:, 1]
            res = {"cpu_prob_range": [round(float(ref.min()), 4), round(float(ref.max()), 4)]}
            gm = model.to(DEV)
            xg = xt.to(DEV)
            for label, dtype, tf32 in (("fp32", None, False), ("fp32_tf32", None, True),
                                       ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                if DEV == "cpu" and dtype == torch.float16:
                    continue
                with torch.autocast(DEV, dtype=dtype or torch.float32, enabled=dtype is not None):
                    p = torch.softmax(gm(xg).float(), 1)[:, 1].cpu()
                res[label] = float((p - ref).abs().max())
            torch.backends.cudnn.allow_tf32 = True
        out[name] = res
        model.cpu()
    return out


def _throughput(model, batch: int, mode: str, seconds: float = 1.0) -> dict:
    import torch

    x = torch.rand(batch, 3, 299, 299, device="cuda")
    if mode in ("bf16_cl", "compile", "cuda_graphs", "fp16_cl", "fp16_graphs", "fp16_compile"):
        model = model.to(memory_format=torch.channels_last)
    dtype = None if mode == "fp32" else torch.float16 if mode.startswith("fp16") else torch.bfloat16

    def step(inp):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(inp)

    fn = step
    if mode in ("compile", "fp16_compile"):
        fn = torch.compile(step, dynamic=False)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        if mode in ("cuda_graphs", "fp16_graphs"):
            static = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step(static)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(static)
            fn = lambda _x: graph.replay()  # noqa: E731
        t0 = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        one = time.perf_counter() - t0
        iters = max(3, min(200, int(seconds / max(one, 1e-4))))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(x)
        end.record()
        torch.cuda.synchronize()
    elapsed = start.elapsed_time(end) / 1000.0
    rate = batch * iters / elapsed
    return {"crops_per_s": round(rate, 1), "ms_per_batch": round(elapsed / iters * 1000, 3),
            "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


COMPILE_S = 90  # what one torch.compile of the full model may take: not started with less time left
THROUGHPUT_MODES = ("fp32", "bf16", "bf16_cl", "cuda_graphs", "compile", "fp16", "fp16_cl", "fp16_graphs",
                    "fp16_compile")


@section("throughput")
def throughput(deadline: float, modes=THROUGHPUT_MODES):
    import torch

    from training.models import create_model

    torch.backends.cudnn.benchmark = True
    model = create_model(ARCH).cuda().eval()
    out: dict = {}
    for mode in modes:
        for batch in (1, 32, 128, 256):
            if time.time() > deadline:
                out.setdefault("skipped", []).append(f"{mode}@{batch}")
                continue
            if mode.endswith("compile") and batch not in (32, 256):
                continue  # each batch size recompiles: two sizes keep the run short
            if mode.endswith("compile") and deadline - time.time() < COMPILE_S:
                out.setdefault("skipped", []).append(f"{mode}@{batch}")  # it would run past the deadline
                continue
            RESULTS["throughput_partial"] = out
            save()
            try:
                fresh = mode.endswith("compile")
                out[f"{mode}@{batch}"] = _throughput(create_model(ARCH).cuda().eval() if fresh else model,
                                                     batch, mode)
            except Exception as exc:  # noqa: BLE001
                out[f"{mode}@{batch}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            torch.cuda.empty_cache()
    rates = {k: v["crops_per_s"] for k, v in out.items() if isinstance(v, dict) and "crops_per_s" in v}
    if rates:
        best = max(rates, key=rates.get)
        base = max((v for k, v in rates.items() if k.startswith("fp32@")), default=None)
        out["best"] = best
        out["best_crops_per_s"] = rates[best]
        out["best_vs_eager_fp32"] = round(rates[best] / base, 2) if base else None
        out["bf16_bound_crops_per_s"] = round(BF16_TFLOPS / GFLOP_PER_CROP)
        out["fraction_of_bf16_bound"] = round(rates[best] / (BF16_TFLOPS / GFLOP_PER_CROP), 3)
    return out


def make_full_model_dir() -> str:
    import torch

    from training.export import save_model_dir
    from training.models import create_model

    d = Path(tempfile.mkdtemp()) / "mdcsd_full"
    torch.manual_seed(0)
    save_model_dir(create_model(ARCH), d, name=f"{ARCH}-random", version="0", architecture=ARCH, trained=False)
    return str(d)


SECTIONS = ("parity", "throughput", "decode", "detect", "pipeline")
# Each section's share of the budget. A section's deadline is the start plus the shares of the wanted
# sections up to and including it, so any order works and time a section leaves goes to the next.
SHARES = {"parity": 0.1, "throughput": 0.4, "decode": 0.1, "detect": 0.1, "pipeline": 0.3}


def deadlines(wanted: list[str], t0: float, budget_s: float) -> dict[str, float]:
    total = sum(SHARES[w] for w in wanted)
    out, spent = {}, 0.0
    for w in wanted:
        spent += SHARES[w]
        out[w] = t0 + budget_s * spent / total
    return out


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--clips", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, run in this order: {', '.join(SECTIONS)}")
    ap.add_argument("--modes", default=",".join(THROUGHPUT_MODES), help="throughput modes")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no throughput: checks the script")
    args = ap.parse_args()
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted({*wanted} - set(SECTIONS)) + sorted({*modes} - set(THROUGHPUT_MODES))
    if unknown:  # before any device time is spent
        ap.error(f"unknown section or mode: {', '.join(unknown)}")
    global DEV, ARCH, CLIPS
    OUT = args.out
    CLIPS = args.clips
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    environment()
    clips = {p.stem: str(p) for p in sorted(args.clips.glob("*.mp4"))}
    if args.dry_run:
        DEV, ARCH = "cpu", "mdcsd_tiny"
        wanted = [w for w in wanted if w != "throughput"]
    until = deadlines(wanted, t0, args.budget_s)
    for name in wanted:
        if name == "parity":
            parity()
        elif name == "throughput":
            throughput(deadline=until[name], modes=modes)
        elif name == "decode":
            if args.dry_run:  # every path once, not figures
                section("decode")(gpu_stages.decode_threading)(clips, thread_counts=(1, 2), repeat=1)
            else:
                section("decode")(gpu_stages.decode_threading)(clips, thread_counts=(1, 4, 16))
        elif name == "detect":
            section("detect")(gpu_stages.detect)(clips, DEV, batches=(8,) if args.dry_run else (8, 32))
        elif name == "pipeline":
            def progress(partial: dict) -> None:
                RESULTS["pipeline_partial"] = partial
                save()

            @section("pipeline")
            def pipeline() -> dict:  # the model directory is built inside, so its failure is the section's
                if args.dry_run:
                    return gpu_stages.pipeline(dict(list(clips.items())[:1]), make_full_model_dir(), DEV,
                                               deadline=t0 + 600, workers_list=(1,), cpus=2, progress=progress,
                                               jobs=2, decodes=1)
                return gpu_stages.pipeline(clips, make_full_model_dir(), DEV, deadline=until[name], progress=progress)
            pipeline()
    RESULTS["total_s"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
