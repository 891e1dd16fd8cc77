"""`deepfake check` against real servers: a worker's settings that work pass every check, and each
common misconfiguration fails its own check with a line that says what is wrong (exit 1), without
stopping the others. Real redis-server (one with an always-fsynced append-only file, one without),
real S3 server, the real model loader and the real CLI entry point."""
from __future__ import annotations

import json
import time
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from servers import free_ports, stop
from workers import DurableRedis

from worker.cli import main
from worker.pipeline import DEFAULT_MODEL_DIR
from worker.preflight import CHECKS

BUCKET = "preflight"


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    s3_server.client().create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture()
def env(bucket, s3_server, redis_server, random_model_dir, monkeypatch):
    """A worker's environment that works: the settings a pod gets from its ConfigMap."""
    values = {"DEEPFAKE_MODEL_DIR": str(random_model_dir), "DEEPFAKE_REDIS_URL": redis_server.url,
              "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint, "DEEPFAKE_ALLOWED_BUCKETS": BUCKET,
              "DEEPFAKE_VERDICT_SECRET": "a-long-random-key", "DEEPFAKE_WEBHOOK_HOSTS": "hooks.example.com,10.0.0.0/8",
              "DEEPFAKE_LOG_FORMAT": "json", "RQ_REDIS_URL": redis_server.url,
              "RQ_WORKER_CLASS": "worker.rq_worker.DeepfakeWorker", "RQ_CONNECTION_CLASS": "worker.redis_client.WaitingRedis",
              "RQ_JOB_CLASS": "worker.rq_worker.DeepfakeJob"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RQ_CONFIG", raising=False)
    return monkeypatch


def check(capsys, *argv: str) -> tuple[int, dict[str, dict]]:
    capsys.readouterr()
    code = main(["check", *argv])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return code, {r["check"]: r for r in lines}


def test_a_working_configuration_passes_every_check(env, capsys, tmp_path):
    durable = DurableRedis(free_ports(1)[0], tmp_path).start()  # appendonly yes, as the README asks
    env.setenv("DEEPFAKE_REDIS_URL", durable.url)
    env.setenv("RQ_REDIS_URL", durable.url)
    try:
        # ... and a maxmemory under noeviction: full, it refuses writes (docs/deploy.md, When Redis is full)
        redis = Redis.from_url(durable.url)
        redis.config_set("maxmemory", 64 * 1024**2)
        code, results = check(capsys)
        # A Redis that evicts keys when full would drop queued jobs and results silently.
        redis.config_set("maxmemory-policy", "allkeys-lru")
        _, evicting = check(capsys, "--only", "redis")
        # One nearly full is about to refuse writes.
        redis.config_set("maxmemory-policy", "noeviction")
        redis.config_set("maxmemory", int(redis.info("memory")["used_memory"] * 1.1))
        _, nearly_full = check(capsys, "--only", "redis")
        # One full refuses writes now: a failure, not a warning (0.4.4 passed it)
        redis.config_set("maxmemory", 1)
        full_code, full = check(capsys, "--only", "redis")
        # One without a limit is killed when it outgrows its memory.
        redis.config_set("maxmemory", 0)
        _, unlimited = check(capsys, "--only", "redis")
    finally:
        stop(durable.proc)
    assert evicting["redis"]["ok"] and "maxmemory-policy is allkeys-lru" in evicting["redis"]["warning"]
    held = re.match(r"Redis holds (\d+)% of its maxmemory: at 100% it refuses writes", nearly_full["redis"]["warning"])
    assert nearly_full["redis"]["ok"] and held and 85 <= int(held[1]) <= 100, nearly_full["redis"]
    assert unlimited["redis"]["ok"] and unlimited["redis"]["warning"].startswith("no maxmemory: ")
    assert full_code == 1 and not full["redis"]["ok"] and "Redis is full: it holds" in full["redis"]["detail"]
    assert "MiB of 64 MiB" in results["redis"]["detail"] and "no maxmemory" in unlimited["redis"]["detail"]
    assert code == 0 and list(results) == list(CHECKS)
    assert all(r["ok"] for r in results.values()), results
    # the only warning: this test model is random, and the check passes the verdict's warning on
    assert {n for n, r in results.items() if r["warning"]} == {"model"}
    assert "carry no information" in results["model"]["warning"] and "on pytorch-cpu" in results["model"]["detail"]
    assert f"{BUCKET} reachable" in results["s3"]["detail"]
    assert "0 waiting" in results["redis"]["detail"]
    assert results["rq"]["detail"] == f"rq worker runs worker.rq_worker.DeepfakeWorker on {durable.url}"


def test_a_clock_far_from_redis_is_warned_of(env, capsys, monkeypatch):
    """RQ dates running jobs by each worker's clock: a CronJob or worker two minutes ahead takes a
    running job for abandoned. The check compares this machine's clock with Redis' TIME (this one's
    moved, as a skewed node's would be)."""
    import worker.preflight as preflight

    _, synced = check(capsys, "--only", "redis")
    assert "clock" not in (synced["redis"]["warning"] or "")
    monkeypatch.setattr(preflight, "_wall_clock", lambda: time.time() + 120)
    code, ahead = check(capsys, "--only", "redis")
    assert code == 0 and ahead["redis"]["ok"]  # a warning: the queue works, its cleaning may misjudge
    assert "this machine's clock is 120 s ahead of Redis'" in ahead["redis"]["warning"], ahead["redis"]


def test_the_rq_check_fails_where_rq_worker_would_fail_or_miss_every_job(env, capsys, redis, redis_server):
    # What it guards against, for real: RQ's own worker fails the JSON job, with no verdict.
    job_id = enqueue_raw(redis)
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RQ_")}
    rq = str(Path(sys.executable).parent / "rq")
    subprocess.run([rq, "worker", "deepfake", "--burst", "--url", redis_server.url], env=plain, timeout=60,
                   capture_output=True, check=True)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "failed" and "DeserializationError" in job.latest_result().exc_string

    env.delenv("RQ_WORKER_CLASS")
    code, results = check(capsys, "--only", "rq")
    assert code == 1 and results["rq"]["detail"].startswith("RQ_WORKER_CLASS is unset: ")
    env.setenv("RQ_WORKER_CLASS", "rq.worker.SimpleWorker")
    code, results = check(capsys, "--only", "rq")
    assert code == 1 and "is not worker.rq_worker.DeepfakeWorker" in results["rq"]["detail"]
    env.setenv("RQ_WORKER_CLASS", "worker.rq_worker.NoSuchWorker")
    code, results = check(capsys, "--only", "rq")
    assert code == 1 and "does not import: AttributeError" in results["rq"]["detail"]
    env.setenv("RQ_WORKER_CLASS", "worker.rq_worker.DeepfakeWorker")
    # the worker on another database, with a password that must not be printed
    other = redis_server.url.rsplit("/", 1)[0].replace("redis://", "redis://:s3cret@") + "/5"
    env.setenv("RQ_REDIS_URL", other)
    code, results = check(capsys, "--only", "rq")
    assert code == 1 and "the worker would listen where no job is queued" in results["rq"]["detail"]
    assert "s3cret" not in results["rq"]["detail"] and ":***@" in results["rq"]["detail"]
    env.delenv("RQ_REDIS_URL")  # RQ's default, localhost:6379/0, is not the test's server either
    code, results = check(capsys, "--only", "rq")
    assert code == 1 and "RQ_REDIS_URL is unset, so RQ's default redis://localhost:6379/0" in results["rq"]["detail"]
    # right class and Redis, plain connection: it works, with a warning
    env.setenv("RQ_REDIS_URL", redis_server.url)
    env.delenv("RQ_CONNECTION_CLASS")
    env.delenv("RQ_JOB_CLASS")
    code, results = check(capsys, "--only", "rq")
    assert code == 0 and "RQ_CONNECTION_CLASS is unset" in results["rq"]["warning"]
    assert "RQ_JOB_CLASS is unset, not worker.rq_worker.DeepfakeJob" in results["rq"]["warning"]
    assert "DEEPFAKE_QUEUE" not in results["rq"]["warning"]
    env.setenv("DEEPFAKE_QUEUE", "other")  # read by enqueuers: the workers' command names their queue
    code, results = check(capsys, "--only", "rq")
    assert code == 0 and "start the workers as `rq worker other`" in results["rq"]["warning"]


def enqueue_raw(redis: Redis) -> str:
    from worker.jobs import MODERATE_FUNC
    from worker.queue import get_queue

    return get_queue(redis, "deepfake").enqueue(MODERATE_FUNC, args=(BUCKET, "clip.mp4"), kwargs={"frames": 4}).id


def test_each_misconfiguration_fails_its_own_check_and_says_why(env, capsys, tmp_path):
    # Redis without persistence: works, with a warning
    code, results = check(capsys, "--only", "redis")
    assert code == 0 and results["redis"]["ok"] and "appendonly" in results["redis"]["warning"]
    # the deny-all default
    env.setenv("DEEPFAKE_ALLOWED_BUCKETS", "")
    code, results = check(capsys, "--only", "s3")
    assert code == 1 and "DEEPFAKE_ALLOWED_BUCKETS is empty" in results["s3"]["detail"]
    # a bucket that is not there, and wrong credentials
    env.setenv("DEEPFAKE_ALLOWED_BUCKETS", f"{BUCKET},no-such-bucket")
    code, results = check(capsys, "--only", "s3")
    assert code == 1 and results["s3"]["detail"].endswith("no-such-bucket: does not exist")
    # any bucket, and no verdict bucket: no bucket to look at, but the endpoint must still answer
    env.setenv("DEEPFAKE_ALLOWED_BUCKETS", "*")
    env.delenv("DEEPFAKE_VERDICT_BUCKET", raising=False)
    code, results = check(capsys, "--only", "s3")
    assert code == 0 and results["s3"]["detail"].endswith(": answers (no bucket named to look at)"), results["s3"]
    with env.context() as closed:
        closed.setenv("DEEPFAKE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
        code, results = check(capsys, "--only", "s3")
        assert code == 1 and "Could not connect to the endpoint URL" in results["s3"]["detail"], results["s3"]
    env.setenv("DEEPFAKE_ALLOWED_BUCKETS", BUCKET)
    env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    env.setattr(boto3, "DEFAULT_SESSION", None)  # boto3 keeps the credentials it first read, as a pod would
    code, results = check(capsys, "--only", "s3")
    assert code == 1 and f"{BUCKET}: access denied" in results["s3"]["detail"]
    # nothing listening where Redis should be; a model directory without its card; a URL as a webhook host
    env.setenv("DEEPFAKE_REDIS_URL", f"redis://127.0.0.1:{free_ports(1)[0]}/0")
    env.setenv("DEEPFAKE_MODEL_DIR", str(tmp_path))
    env.setenv("DEEPFAKE_WEBHOOK_HOSTS", "https://hooks.example.com/deepfake")
    env.delenv("DEEPFAKE_VERDICT_SECRET")
    code, results = check(capsys)
    assert code == 1 and list(results) == list(CHECKS)  # every check ran, none stopped the others
    assert not results["redis"]["ok"] and results["redis"]["detail"].startswith("ConnectionError")
    assert not results["model"]["ok"] and f"no model.json in {tmp_path}" in results["model"]["detail"]
    assert not results["webhooks"]["ok"] and "https://hooks.example.com/deepfake" in results["webhooks"]["detail"]
    assert results["signing"]["ok"] and "DEEPFAKE_VERDICT_SECRET" in results["signing"]["warning"]


def test_a_gpu_worker_passes_the_model_check_only_where_cuda_is(env, capsys):
    env.setenv("DEEPFAKE_DEVICE", "cuda")
    code, results = check(capsys, "--only", "model")
    if torch.cuda.is_available():
        assert code == 0 and results["model"]["ok"] and "on cuda" in results["model"]["detail"]
    else:
        assert code == 1 and not results["model"]["ok"] and "cuda" in results["model"]["detail"].lower()


def test_the_model_check_names_how_crops_are_cut_and_warns_of_another_detector(env, capsys, random_model_dir,
                                                                              tmp_path):
    from worker.engine.model_card import ModelCard

    code, results = check(capsys, "--only", "model")
    assert code == 0 and results["model"]["detail"].endswith(", crops 299 px at 1.3×")
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    card = ModelCard.load(model)
    card.crop_recipe = {"size": 299, "scale": 1.5, "detector": "retinaface-resnet50", "version": 2}
    card.save(model)
    env.setenv("DEEPFAKE_MODEL_DIR", str(model))
    code, results = check(capsys, "--only", "model")
    assert code == 0 and results["model"]["detail"].endswith(", crops 299 px at 1.5×")
    assert "the model's training faces were found by retinaface-resnet50, this worker's by retinaface-mobilenet" \
        in results["model"]["warning"] and "carry no information" in results["model"]["warning"]


def test_the_model_check_loads_and_names_the_shadow_model(env, capsys, tmp_path):
    env.setenv("DEEPFAKE_SHADOW_MODEL_DIR", str(DEFAULT_MODEL_DIR))
    code, results = check(capsys, "--only", "model")
    assert code == 0 and ", shadow mdcsd-tiny-sbi-demo 0.1.0-demo (sha256 " in results["model"]["detail"]
    env.setenv("DEEPFAKE_SHADOW_MODEL_DIR", str(tmp_path))  # no model there: every scored job would fail
    code, results = check(capsys, "--only", "model")
    assert code == 1 and f"DEEPFAKE_SHADOW_MODEL_DIR: no model.json in {tmp_path}" in results["model"]["detail"]


def test_the_model_check_fails_a_model_whose_scores_are_not_probabilities(env, capsys, nan_model_dir):
    env.setenv("DEEPFAKE_MODEL_DIR", str(nan_model_dir))
    code, results = check(capsys, "--only", "model")
    assert code == 1 and results["model"]["detail"] == (
        "scoring one crop: the model gave 1 of 1 scores outside [0, 1] (e.g. nan): not probabilities")


def test_unknown_check_names_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--only", "redis,gpu"])
    assert exc.value.code == 2 and "unknown check gpu" in capsys.readouterr().err


def test_a_worker_started_with_no_bucket_allowed_says_so_at_start(redis, settings, capsys):
    from worker.rq_worker import DeepfakeWorker

    worker = DeepfakeWorker(["deepfake"], connection=redis)
    worker.load_runtime(settings.model_copy(update={"allowed_buckets": "", "metrics_port": 0, "log_format": "json"}))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warning = next(e for e in events if e["event"] == "no_bucket_allowed")
    assert warning["level"] == "warning" and "every job will be refused" in warning["reason"]
    assert next(e for e in events if e["event"] == "worker_ready")["allowed_buckets"] == []


def test_a_worker_whose_settings_name_another_redis_says_so_at_start(redis, redis_server, settings, capsys):
    from worker.rq_worker import DeepfakeWorker

    other = redis_server.url.rsplit("/", 1)[0].replace("redis://", "redis://:s3cret@") + "/7"
    worker = DeepfakeWorker(["deepfake"], connection=redis)
    worker.load_runtime(settings.model_copy(update={"redis_url": other, "metrics_port": 0, "log_format": "json"}))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warning = next(e for e in events if e["event"] == "redis_url_mismatch")
    assert warning["level"] == "warning" and warning["worker"] == redis_server.url.rsplit("/", 1)[0] + "/0"
    assert warning["settings"].endswith("/7") and "s3cret" not in json.dumps(warning)

    same = DeepfakeWorker(["deepfake"], connection=redis)
    same.load_runtime(settings.model_copy(update={"redis_url": redis_server.url, "metrics_port": 0,
                                                  "log_format": "json"}))
    assert "redis_url_mismatch" not in capsys.readouterr().err


def test_a_worker_started_with_a_misspelt_variable_or_unusable_webhook_hosts_says_so_at_start(redis, settings, capsys, monkeypatch):
    from worker.rq_worker import DeepfakeWorker

    from conftest import TEST_KNOBS

    for knob in TEST_KNOBS:  # the suite's own variables, which a shell running it may set
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("DEEPFAKE_FRAME", "64")  # DEEPFAKE_FRAMES meant: nothing reads this one
    monkeypatch.setenv("deepfake_webhook_host", "hooks.example.com")
    monkeypatch.setenv("DEEPFAKE_BENCH_DIR", "/tmp/bench")  # bench/'s, not a worker setting, not reported
    worker = DeepfakeWorker(["deepfake"], connection=redis)
    worker.load_runtime(settings.model_copy(update={"metrics_port": 0, "log_format": "json",
                                                    "webhook_hosts": "hooks.example.com,10.0.0.0/33"}))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warning = next(e for e in events if e["event"] == "unknown_settings")
    assert warning["names"] == ["DEEPFAKE_FRAME", "deepfake_webhook_host"] and "misspelt" in warning["reason"]
    # a CIDR that is none (/33) was taken for a host name no receiver has: said at start, not per refused webhook
    hosts = next(e for e in events if e["event"] == "webhook_hosts_unusable")
    assert hosts["reason"] == "DEEPFAKE_WEBHOOK_HOSTS: not a host name, .suffix, IP or CIDR: 10.0.0.0/33"


def test_a_worker_whose_settings_name_another_queue_says_so_at_start(redis, settings, capsys):
    """DEEPFAKE_QUEUE is read by enqueuers; the worker listens on the queue its command names."""
    from worker.rq_worker import DeepfakeWorker

    worker = DeepfakeWorker(["deepfake"], connection=redis)
    worker.load_runtime(settings.model_copy(update={"queue": "other", "metrics_port": 0, "log_format": "json"}))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warning = next(e for e in events if e["event"] == "queue_mismatch")
    assert warning["worker"] == ["deepfake"] and warning["settings"] == "other"
    assert "rq worker other" in warning["reason"] and "rq:queue:other" in warning["reason"]

    both = DeepfakeWorker(["other", "deepfake"], connection=redis)
    both.load_runtime(settings.model_copy(update={"queue": "other", "metrics_port": 0, "log_format": "json"}))
    assert "queue_mismatch" not in capsys.readouterr().err
