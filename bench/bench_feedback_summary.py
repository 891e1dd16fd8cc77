"""`deepfake feedback-summary` over a prefix of verdicts with reviewer feedback: one GET at a time
against `worker.verdict_store.SCAN_THREADS` in parallel, side by side, on a real SeaweedFS S3 server on
loopback, directly and through a loopback proxy that holds each GET for `--latency-ms` (a cloud
region's round trip, which loopback lacks).

    python bench/bench_feedback_summary.py [--uploads 1000] [--repeat 3] [--latency-ms 0,20]

Each upload has a verdict object and a feedback object beside it, as `deepfake feedback` leaves them;
the two ways are interleaved round by round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy, Rule  # noqa: E402
from servers import S3_ACCESS_KEY, S3_SECRET_KEY, S3Server, stop  # noqa: E402

from worker import feedback, verdict_store  # noqa: E402
from worker.settings import Settings  # noqa: E402

BUCKET = "reviewed"
PARALLEL = verdict_store.SCAN_THREADS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--latency-ms", default="0,20", help="comma-separated; 0 = straight to the server")
    args = ap.parse_args()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
    record = {"schema": feedback.SCHEMA, "label": "fake",
              "verdict": {"status": "ok", "action": "review", "model": {"name": "m", "version": "1", "sha256": "0" * 64}}}
    with tempfile.TemporaryDirectory() as tmp:
        s3_server = S3Server.start(Path(tmp))
        try:
            s3 = s3_server.bucket_with(BUCKET, {})
            for i in range(args.uploads):
                key = f"verdicts/2026/{i:06d}.mp4"
                s3.put_object(Bucket=BUCKET, Key=f"{key}.json", Body=b"{}")
                s3.put_object(Bucket=BUCKET, Key=f"{key}{feedback.SUFFIX}", Body=json.dumps(record).encode())
            results = {}
            for latency_ms in (int(x) for x in args.latency_ms.split(",")):
                with FaultProxy(s3_server.port) as proxy:
                    if latency_ms:
                        proxy.add(Rule(action="delay", method="GET", path=feedback.SUFFIX, delay_s=latency_ms / 1000))
                    endpoint = proxy.endpoint if latency_ms else s3_server.endpoint
                    results[latency_ms] = measure(Settings(s3_endpoint_url=endpoint, log_format="json"), args)
        finally:
            stop(s3_server.proc)
    for latency_ms, times in results.items():
        base = statistics.median(next(iter(times.values())))
        where = f"each feedback GET held {latency_ms} ms" if latency_ms else "straight to the server"
        print(f"{args.uploads} uploads with feedback ({2 * args.uploads} objects listed), {where}, "
              f"median of {args.repeat} interleaved rounds")
        print(f"{'':26}{'s':>8}{'records/s':>11}{'× one':>8}")
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"{name:26}{t:8.2f}{args.uploads / t:11.0f}{base / t:8.2f}")


def measure(settings: Settings, args: argparse.Namespace) -> dict[str, list[float]]:
    from worker.s3 import make_client

    s3 = make_client(settings.s3_endpoint_url)
    threads = {"one GET at a time": 1, f"{PARALLEL} GETs in parallel": PARALLEL}
    times: dict[str, list[float]] = {name: [] for name in threads}
    for _ in range(args.repeat):
        for name, n in threads.items():
            verdict_store.SCAN_THREADS = n
            t0 = time.perf_counter()
            summary = feedback.summarize(BUCKET, "2026/", settings=settings, s3_client=s3)
            times[name].append(time.perf_counter() - t0)
            assert summary["feedback"] == args.uploads, summary
    verdict_store.SCAN_THREADS = PARALLEL
    return times

if __name__ == "__main__":
    main()
