"""Queueing a backlog: uploads queued per second by `deepfake enqueue` (a HEAD per key for its ETag)
and by `deepfake backfill` (the ETag from the listing), side by side, against a real redis-server
and a real SeaweedFS S3 server on loopback.

    python bench/bench_backfill.py [--uploads 1000] [--repeat 3]

The two are interleaved round by round, each on an emptied Redis database (no duplicates to find).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis import Redis  # noqa: E402
from servers import S3_ACCESS_KEY, S3_SECRET_KEY, RedisServer, S3Server, stop  # noqa: E402

from worker.backfill import backfill  # noqa: E402
from worker.queue import enqueue, get_queue  # noqa: E402
from worker.settings import Settings  # noqa: E402

BUCKET = "backlog"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("redis", "s3"):
            (Path(tmp) / name).mkdir()
        redis_server, s3_server = RedisServer.start(Path(tmp) / "redis"), S3Server.start(Path(tmp) / "s3")
        try:
            keys = [f"2026/{i // 100:03d}/{i:06d}.mp4" for i in range(args.uploads)]
            s3 = s3_server.bucket_with(BUCKET, {})
            for key in keys:
                s3.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(1024), ContentType="video/mp4")
            settings = Settings(redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint,
                                allowed_buckets=BUCKET, log_format="json")
            redis = Redis.from_url(redis_server.url)

            def by_enqueue() -> None:
                for key in keys:
                    enqueue(BUCKET, key, settings=settings, connection=redis, s3_client=s3)

            def by_backfill() -> None:
                stats = backfill(BUCKET, "2026/", settings=settings, connection=redis, s3_client=s3)
                assert stats.enqueued == len(keys), stats

            times: dict[str, list[float]] = {"deepfake enqueue (HEAD per key)": [], "deepfake backfill (listing)": []}
            for _ in range(args.repeat):
                for name, run in zip(times, (by_enqueue, by_backfill)):
                    redis.flushdb()
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
                    assert get_queue(redis, settings.queue).count == len(keys)
        finally:
            stop(redis_server.proc)
            stop(s3_server.proc)
    base = statistics.median(next(iter(times.values())))
    print(f"{args.uploads} uploads, median of {args.repeat} interleaved rounds")
    print(f"{'':34}{'s':>8}{'uploads/s':>11}{'× enqueue':>11}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:34}{t:8.2f}{len(keys) / t:11.0f}{base / t:11.2f}")


if __name__ == "__main__":
    main()
