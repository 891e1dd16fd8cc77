"""How far ONNX Runtime INT8 moves the packaged demo model's probabilities from FP32, calibrated on a
crop cache's training split (the README's recipe), on that split and on its test split.

    python -m training make-demo-data --out /tmp/demo
    python bench/bench_int8_drift.py --data /tmp/demo
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from training.data import load_crop, read_index
from worker.engine import load_engine
from worker.pipeline import DEFAULT_MODEL_DIR


def crops(root: Path, split: str) -> np.ndarray:
    return np.stack([load_crop(root / split / r.path) for r in read_index(root, split)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a crop cache (make-demo-data's --out)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    fp32 = load_engine(args.model_dir, backend="onnxruntime")
    with tempfile.TemporaryDirectory() as cache:
        int8 = load_engine(args.model_dir, backend="onnxruntime", precision="int8", calibration=args.data / "train",
                           cache_dir=Path(cache))
        print(f"int8_max_abs_diff (the verdict's, at build): {int8.describe()['int8_max_abs_diff']}")
        for split, what in (("train", "calibration"), ("test", "held out")):
            x = crops(args.data, split)
            d = np.abs(fp32.predict(x) - int8.predict(x))
            print(f"{split} ({what}): n={len(x)} max={d.max():.3f} median={np.median(d):.3f} "
                  f"p95={np.percentile(d, 95):.3f}")


if __name__ == "__main__":
    main()
