"""`python -m bench`: seven CPU benchmarks in one run, on the same inputs (the backlog, early-exit and
feedback-summary benches run on their own: bench/README.md).

1. engines: crops/s of each available engine and the ratio to PyTorch eager (bench_engines.py);
2. the whole pipeline vs the model alone on a 10 s 720p clip at 32 frames, with peak RSS
   (bench_pipeline.py);
3. sampled decode vs decode-all on that clip (bench_decode.py), and what bringing HDR (HLG, PQ) to SDR
   adds to a sampled decode (bench_hdr.py);
4. the RetinaFace network: the worker's channels-last PyTorch path vs NCHW input vs ONNX Runtime
   (bench_detect.py);
5. what the sampling gap costs on a 10-minute video (bench_sample_gap.py);
6. what a finished job's result costs Redis, whole verdict vs summary (bench_result_size.py: starts
   its own redis-server and SeaweedFS).
Each runs in its own process so one's memory does not count against another's.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    status = 0
    for script, args in (("bench_engines.py", ["--models", "mdcsd"]), ("bench_pipeline.py", []),
                         ("bench_decode.py", []), ("bench_hdr.py", []), ("bench_detect.py", []),
                         ("bench_sample_gap.py", []), ("bench_result_size.py", [])):
        print(f"\n### {script} {' '.join(args)}", flush=True)
        status |= subprocess.call([sys.executable, str(HERE / script), *args])
    return status


if __name__ == "__main__":
    sys.exit(main())
