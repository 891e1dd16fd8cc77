"""What a finished job costs Redis: the job's result with DEEPFAKE_RESULT_DETAIL=full (the whole
verdict) and =summary (the default), side by side, against a real redis-server and a real SeaweedFS
S3 server on loopback, with the packaged demo model.

    python bench/bench_result_size.py [--minutes 10]

Redis keeps each result for DEEPFAKE_RESULT_TTL_S (7 days): bytes per job × uploads per week is
the memory it needs. Clips: the real carphone clip (one face, 4 s), the same tiled 3×3 as a call
grid (nine faces), and that grid for `--minutes` at 1 frame/s (more samples: DEEPFAKE_MAX_SAMPLE_GAP_S).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from redis import Redis  # noqa: E402
from servers import S3_ACCESS_KEY, S3_SECRET_KEY, RedisServer, S3Server, stop  # noqa: E402

BUCKET = "uploads"


def clips(directory: Path, minutes: float) -> dict[str, Path]:
    from media import carphone_frames, carphone_path, encode

    grid = [np.ascontiguousarray(np.tile(f, (3, 3, 1))) for f in carphone_frames()[::8]]
    long_grid = [grid[i % len(grid)] for i in range(int(minutes * 60))]
    return {
        "carphone, 1 face, 4 s": carphone_path(),
        "3x3 grid, 9 faces, 4 s": encode(directory / "grid.mp4", grid, rate=4),
        f"3x3 grid, 9 faces, {minutes:g} min": encode(directory / "long.mp4", long_grid, rate=1),
    }


def redis_bytes(redis: Redis, job_id: str) -> int:
    """MEMORY USAGE of the job's hash and its results stream (where RQ keeps the return value)."""
    return sum(redis.memory_usage(k, samples=0) or 0 for k in (f"rq:job:{job_id}", f"rq:results:{job_id}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    from workers import burst

    from worker.queue import enqueue, job_state
    from worker.runtime import WorkerRuntime
    from worker.settings import Settings

    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("redis", "s3", "clips"):
            (Path(tmp) / name).mkdir()
        redis_server, s3_server = RedisServer.start(Path(tmp) / "redis"), S3Server.start(Path(tmp) / "s3")
        try:
            videos = clips(Path(tmp) / "clips", args.minutes)
            s3 = s3_server.bucket_with(BUCKET, {f"{i}.mp4": p.read_bytes() for i, p in enumerate(videos.values())})
            redis = Redis.from_url(redis_server.url)
            base = Settings(redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint, allowed_buckets=BUCKET,
                            log_format="json", log_level="WARNING", metrics_port=0)
            runtime = WorkerRuntime(base, s3_client=s3)
            for i, name in enumerate(videos):
                sizes = {}
                for detail in ("full", "summary"):  # the second job reuses the stored verdict: the same one
                    settings = base.model_copy(update={"result_detail": detail})
                    runtime.settings = settings
                    job_id = enqueue(BUCKET, f"{i}.mp4", settings=settings, connection=redis, s3_client=s3)
                    burst(redis, settings, runtime=runtime)
                    result = job_state(job_id, settings=settings, connection=redis).result
                    sizes[detail] = (len(json.dumps(result, separators=(",", ":"))), redis_bytes(redis, job_id), result)
                    redis.delete(*redis.keys("deepfake:dedupe:*"))  # the next job is a new one, not the duplicate
                full = sizes["full"][2]
                rows.append((name, full["video"]["frames_sampled"], len(full["faces"]), sizes["full"][:2],
                             sizes["summary"][:2]))
        finally:
            stop(redis_server.proc)
            stop(s3_server.proc)
    print(f"{'':30}{'frames':>7}{'faces':>7}{'full JSON':>11}{'full Redis':>12}"
          f"{'summary JSON':>14}{'summary Redis':>15}{'full ÷ summary':>16}")
    for name, frames, faces, (fj, fr), (sj, sr) in rows:
        print(f"{name:30}{frames:7d}{faces:7d}{fj:11,d}{fr:12,d}{sj:14,d}{sr:15,d}{fr / sr:16.1f}")
    print("Redis bytes: MEMORY USAGE of rq:job:<id> + rq:results:<id>; × uploads per DEEPFAKE_RESULT_TTL_S "
          "is the memory results take.")


if __name__ == "__main__":
    main()
