"""How fast training reads its crops: crops/s through the training DataLoader (PNG decode, the worker's
tensor layout, hflip and `Augment`, batches of 32) with 0, 1, 2 ... worker processes, side by side,
against the model's own training step on this machine.

    python bench/bench_crop_loading.py [--size 299] [--data CACHE] [--repeat 8] [--passes 3] [--steps 4]

Without `--data` it builds the SBI demo cache (real faces) at `--size` in a temporary directory. A
pass reads the split `--repeat` times over, so that it is long beside the workers' start, as an
epoch of FF++ crops is.
With 0 workers the training process decodes every crop between its steps: that rate is the most a
GPU can be fed then, whatever its own speed (`train --workers`, default auto: up to 8 on CUDA).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402


def loading_rate(dataset, workers: int, passes: int) -> float:
    """Crops/s over `passes` shuffled passes (a fresh set of worker processes each, as train starts)."""
    n, t0 = 0, time.perf_counter()
    for _ in range(passes):
        for x, _, _ in DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers):
            n += len(x)
    return n / (time.perf_counter() - t0)


def step_rate(size: int, steps: int) -> float:
    """Crops/s of mdcsd's fp32 training step (forward, backward, Adam) at batch 32 on this CPU."""
    from training.models import create_model
    from training.train import TrainConfig, build_optimizer

    model = create_model("mdcsd", input_size=size).train()
    opt = build_optimizer(model, TrainConfig())
    x, y = torch.rand(32, 3, size, size), torch.arange(32) % 2
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step warms up
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 32 * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=299, help="crop side of the demo cache built; default: %(default)s")
    ap.add_argument("--data", type=Path, help="an existing crop cache (its train split) instead of the demo's")
    ap.add_argument("--repeat", type=int, default=8, help="the split read this many times a pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="training steps timed; 0 skips the model")
    ap.add_argument("--workers", type=int, nargs="+", help="default: 0 up to the usable CPUs")
    args = ap.parse_args()
    from training.data import CropDataset, build_demo_crops
    from training.sampling import Augment
    from worker.cpus import available_cpus

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "demo"
            build_demo_crops(root, size=args.size, seed=0, progress=False)
        dataset = ConcatDataset([CropDataset(root, "train", transform=Augment(), hflip=True)] * args.repeat)
        side = dataset[0][0].shape[-1]
        torch.set_num_threads(available_cpus())
        loading_rate(dataset.datasets[0], 0, 1)  # the page cache holds the crops for every row alike
        rows = [(w, loading_rate(dataset, w, args.passes))
                for w in (args.workers or range(available_cpus() + 1))]
    base = rows[0][1]
    print(f"{len(dataset)} crops of {side}x{side} px, {args.passes} passes, batch 32, {available_cpus()} CPUs")
    print(f"{'DataLoader workers':<22}{'crops/s':>10}{'x 0 workers':>14}")
    for workers, rate in rows:
        print(f"{workers:<22}{rate:>10.0f}{rate / base:>14.2f}")
    if args.steps:
        rate = step_rate(side, args.steps)
        print(f"{'mdcsd training step (fp32, this CPU)':<36}{rate:>10.1f} crops/s")


if __name__ == "__main__":
    main()
