"""Soak: many small jobs through two real `rq worker deepfake` processes, with faults injected, on loopback.

The mix: tiny clips with a face, tiny clips without one, bad files (text, damaged, audio only), keys
that were never uploaded, and a fault proxy in front of S3 answering ~5% of reads with 503 and
resetting ~1% of connections. Every job must end finished with the verdict its file calls for, each
key must have exactly one verdict object, no worker may die, and worker memory must not grow.

    DEEPFAKE_SOAK_JOBS=500 pytest -m slow tests/test_soak.py -s     # the full run (default: 120 jobs)

It prints jobs/s, p50/p95 job latency (time in a worker, and enqueue to done) and each worker's RSS
when idle after loading, after the first tenth of the jobs, and at the end.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from faultproxy import FaultProxy, Rule
from media import carphone_frames, damage_tail, encode, encode_audio_only, scenery_frames
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from workers import Supervisor, stored, wait_until_final

from worker.queue import enqueue, job_state
from worker.settings import Settings

BUCKET = "faults"
JOBS = int(os.environ.get("DEEPFAKE_SOAK_JOBS", "120"))
RSS_GROWTH_LIMIT_MB = 150
KINDS = [  # (kind, share, expected outcome)
    ("face", 0.55, "ok"),
    ("scenery", 0.15, "no_face"),
    ("text", 0.06, "not_a_video"),
    ("damaged", 0.06, "corrupt"),
    ("audio", 0.04, "no_video_stream"),
    ("missing", 0.14, "not_found"),
]


def soak_media(directory: Path) -> dict[str, bytes]:
    faces = carphone_frames()[::15]  # 8 frames
    clips: dict[str, bytes] = {}
    encode(directory / "face.mp4", faces, rate=4)
    clips["face"] = (directory / "face.mp4").read_bytes()
    encode(directory / "scenery.mp4", scenery_frames(8, size=(48, 64)), rate=4)
    clips["scenery"] = (directory / "scenery.mp4").read_bytes()
    clips["text"] = b"not a video\n" * 64
    encode(directory / "full.mp4", faces, rate=4, container_options={"movflags": "+faststart"})
    clips["damaged"] = damage_tail(directory / "full.mp4", directory / "damaged.mp4", 0.75).read_bytes()
    clips["audio"] = encode_audio_only(directory / "audio.mp4", seconds=0.5).read_bytes()
    return clips


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_many_small_jobs_with_faults(s3_server, redis_server, random_model_dir, tmp_path):
    rng = random.Random(20261128)
    direct = s3_server.client()
    try:
        direct.create_bucket(Bucket=BUCKET)
    except direct.exceptions.BucketAlreadyOwnedByYou:
        pass
    clips = soak_media(tmp_path)
    plan: list[tuple[str, str, str, int]] = []  # key, kind, expected, frames
    weights = [share for _, share, _ in KINDS]
    for i in range(JOBS):
        kind, _, expected = rng.choices(KINDS, weights=weights)[0]
        key = f"soak-{tmp_path.name}/{kind}/{i:05d}.mp4"
        if kind != "missing":
            direct.put_object(Bucket=BUCKET, Key=key, Body=clips[kind],
                              ContentType="video/mp4")
        plan.append((key, kind, expected, rng.randint(2, 4)))

    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    with FaultProxy(s3_server.port, seed=7) as proxy:
        proxy.add(Rule("reset", path=f"soak-{tmp_path.name}/", probability=0.01))
        proxy.add(Rule("status", path=f"soak-{tmp_path.name}/", status=503, probability=0.05))
        settings = Settings(model_dir=random_model_dir, redis_url=redis_server.url, s3_endpoint_url=proxy.endpoint,
                            allowed_buckets=BUCKET, frames=4, metrics_port=0, job_retries=3,
                            verdict_prefix=f"verdicts-{tmp_path.name}/")
        supervisor = Supervisor(settings, redis_server.url, tmp_path, env={"DEEPFAKE_LOG_LEVEL": "WARNING"}).start()
        try:
            from rq import Worker

            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                workers = Worker.all(connection=redis)
                if len(workers) == 2 and all(w.get_state() == "idle" for w in workers):
                    break
                time.sleep(0.2)
            else:  # the idle memory below would be a loading worker's
                pytest.fail(f"workers never became idle\n{supervisor.logs()}")
            pids = {name: p.pid for name, p in supervisor.procs.items()}
            rss_idle = {name: rss_mb(pid) for name, pid in pids.items()}

            t0 = time.monotonic()
            job_ids = [enqueue(BUCKET, key, frames=frames, settings=settings, connection=redis, s3_client=direct)
                       for key, _, _, frames in plan]
            assert len(set(job_ids)) == JOBS
            warm_at = max(1, JOBS // 10)
            rss_warm: dict[str, float] = {}
            while not rss_warm and time.monotonic() - t0 < 600:
                done = sum(1 for j in job_ids[:warm_at * 2]
                           if Job.fetch(j, connection=redis, serializer=JSONSerializer).get_status() == "finished")
                if done >= warm_at:
                    rss_warm = {name: rss_mb(pid) for name, pid in pids.items()}
                time.sleep(0.2)
            statuses = wait_until_final(lambda: redis, job_ids, supervisor, timeout=max(600, JOBS * 4))
            wall = time.monotonic() - t0
            rss_end = {name: rss_mb(pid) for name, pid in pids.items()}
        finally:
            supervisor.stop()
        faults = proxy.faults()

    assert supervisor.restarts == 0, supervisor.logs()
    assert set(statuses.values()) == {"finished"}, {s: list(statuses.values()).count(s) for s in set(statuses.values())}
    service, end_to_end = [], []
    for job_id, (key, kind, expected, frames) in zip(job_ids, plan):
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        service.append((job.ended_at - job.started_at).total_seconds())
        end_to_end.append((job.ended_at - job.enqueued_at).total_seconds())
        verdict = job_state(job_id, settings=settings, connection=redis).result
        got = verdict["status"] if verdict["status"] != "error" else verdict["error"]["code"]
        assert got == expected, (key, verdict["error"])
    listed = []
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=settings.verdict_prefix):
        listed += [o["Key"] for o in page.get("Contents", [])]
    assert sorted(listed) == sorted(f"{settings.verdict_prefix}{key}.json" for key, *_ in plan)  # one each
    for key, *_ in rng.sample(plan, min(20, JOBS)):  # whole and parseable
        [only] = stored(direct, settings, key)
        assert only["source"] == f"s3://{BUCKET}/{key}"
    assert faults, "the proxy injected no fault"

    report = {
        "jobs": JOBS, "workers": 2, "wall_s": round(wall, 1), "jobs_per_s": round(JOBS / wall, 2),
        "service_p50_s": round(percentile(service, 50), 3), "service_p95_s": round(percentile(service, 95), 3),
        "end_to_end_p50_s": round(percentile(end_to_end, 50), 2),
        "end_to_end_p95_s": round(percentile(end_to_end, 95), 2),
        "faults_injected": {kind: sum(f.fault == kind for f in faults) for kind in ("status", "reset")},
        "rss_mb": {name: {"idle": round(rss_idle[name]), "warm": round(rss_warm.get(name, 0)),
                          "end": round(rss_end[name])} for name in pids},
        "outcomes": {exp: sum(1 for p in plan if p[2] == exp) for _, _, exp in KINDS},
    }
    print("\nSOAK " + json.dumps(report))
    if os.environ.get("DEEPFAKE_SOAK_REPORT"):
        Path(os.environ["DEEPFAKE_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
    for name in pids:
        growth = rss_end[name] - rss_warm[name]
        assert growth < RSS_GROWTH_LIMIT_MB, f"{name} grew {growth:.0f} MB after warm-up ({report['rss_mb'][name]})"
