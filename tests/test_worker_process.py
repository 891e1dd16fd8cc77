"""`rq worker deepfake` as a process, as the image and the manifests run it, against a real
redis-server and S3 server: SIGKILL mid-job (the job is retried to completion, nothing half-written),
SIGTERM mid-job (the job in hand finishes, then the worker exits), and its /metrics and /healthz."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from servers import free_ports
from workers import burst, queue_settings, start_rq_worker, stored, worker_env

from worker.queue import enqueue, job_state

BUCKET = "lifecycle"
UPLOADS = {"carphone": "clips/carphone.mp4", "vp9_webm": "clips/vp9.webm", "text_mp4": "bad/text.mp4"}


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    return s3_server.bucket_with(BUCKET, {key: corpus[name].read_bytes() for name, key in UPLOADS.items()})


@pytest.fixture()
def qsettings(random_model_dir, redis_server, s3_server, tmp_path):
    return queue_settings(random_model_dir, redis_server, s3_server, tmp_path, BUCKET, job_retries=2)


def wait_status(job_id, redis, status, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status()
        if current == status:
            return
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached {status} (now {current})")


def test_killed_worker_job_is_retried_to_completion(s3, redis, redis_server, qsettings, moderator, tmp_path):
    qsettings = qsettings.model_copy(update={"job_retry_backoff_s": "0"})  # requeued at once by the cleanup
    job_id = enqueue(BUCKET, UPLOADS["carphone"], frames=120, settings=qsettings, connection=redis, s3_client=s3)
    proc = start_rq_worker(worker_env(qsettings, redis_server.url, DEEPFAKE_FRAMES="32"), tmp_path / "worker.log")
    try:
        wait_status(job_id, redis, "started")
        os.killpg(proc.pid, signal.SIGKILL)  # the pod is gone mid-job
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    registry = StartedJobRegistry("deepfake", connection=redis, serializer=JSONSerializer)
    assert job_id in registry.get_job_ids(cleanup=False)
    # RQ's own abandoned-job handling, run as a worker's maintenance does once the heartbeat expires.
    registry.cleanup(timestamp=time.time() + qsettings.job_timeout_s(120) + 120)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "queued" and job.retries_left == qsettings.job_retries - 1
    assert stored(s3, qsettings, UPLOADS["carphone"]) == []  # nothing half-written by the killed worker
    burst(redis, qsettings, moderator)
    state = job_state(job_id, settings=qsettings, connection=redis)
    assert state.status == "finished" and state.result["video"]["frames_sampled"] == 120
    [only] = stored(s3, qsettings, UPLOADS["carphone"])
    assert only["created_at"] == state.result["created_at"]


def test_sigterm_finishes_the_job_in_hand_then_exits(s3, redis, redis_server, qsettings, tmp_path):
    port = free_ports(1)[0]
    job_id = enqueue(BUCKET, UPLOADS["carphone"], frames=120, settings=qsettings, connection=redis, s3_client=s3)
    queued_after = enqueue(BUCKET, UPLOADS["vp9_webm"], settings=qsettings, connection=redis, s3_client=s3)
    env = worker_env(qsettings, redis_server.url, DEEPFAKE_FRAMES="32", DEEPFAKE_METRICS_PORT=str(port))
    proc = start_rq_worker(env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the model is loaded before the first job
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        wait_status(job_id, redis, "started")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    state = job_state(job_id, settings=qsettings, connection=redis)
    assert state.status == "finished" and state.result["status"] == "ok"
    assert Job.fetch(queued_after, connection=redis, serializer=JSONSerializer).get_status() == "queued"
    log = (tmp_path / "worker.log").read_text()
    assert "job_done" in log
    lines = [json.loads(line) for line in log.splitlines()]  # RQ's own lines too, its scheduler's among them
    said = {(line.get("logger"), line["event"].split(" ")[0]) for line in lines}
    assert {("rq.worker", "Worker"), ("rq.scheduler", "Scheduler")} <= said, said
    # The job's lines name it, the pipeline's and RQ's among them; job_done has each stage's time.
    job_lines = {line["event"]: line for line in lines if line.get("job_id") == job_id}
    assert {"decoded", "verdict", "job_done"} <= set(job_lines), [line["event"] for line in lines]
    assert any(e.startswith("Successfully completed moderate") for e in job_lines), list(job_lines)  # RQ's
    assert {"decode", "detect", "model", "store", "total"} <= set(job_lines["job_done"]["timings_ms"])
    ready = next(json.loads(line) for line in log.splitlines() if '"worker_ready"' in line)
    assert ready["allowed_buckets"] == [BUCKET] and ready["queues"] == ["deepfake"] and ready["load_s"] > 0
    assert ready["shadow_model"] is None
    assert "no_bucket_allowed" not in log


def test_metrics_and_health_endpoint(s3, redis, redis_server, qsettings, tmp_path):
    port = free_ports(1)[0]
    enqueue(BUCKET, UPLOADS["text_mp4"], settings=qsettings, connection=redis, s3_client=s3)
    env = worker_env(qsettings, redis_server.url, DEEPFAKE_FRAMES="32", DEEPFAKE_METRICS_PORT=str(port))
    proc = start_rq_worker(env, tmp_path / "worker.log")
    body, health = "", None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 'deepfake_jobs_total{status="error"} 1.0' not in body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
                time.sleep(0.05)
        while time.monotonic() < deadline and health != (200, "idle"):  # "busy" until the job returns
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                health = (resp.status, resp.read().decode())
            time.sleep(0.05)
        # and over IPv6, as an IPv6-only cluster's kubelet probes it (0.4.4 listened on IPv4 alone)
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=2) as resp:
            assert (resp.status, resp.read().decode()) == (200, "idle")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 'deepfake_errors_total{code="not_a_video"} 1.0' in body
    assert "deepfake_model_loaded 1.0" in body and "deepfake_queue_wait_seconds_count 1.0" in body
    # the queue's state, read from Redis by the worker process's exporter
    assert 'deepfake_queue_jobs{queue="deepfake",state="failed"} 0.0' in body
    assert 'deepfake_queue_oldest_job_age_seconds{queue="deepfake"} 0.0' in body
    assert health == (200, "idle")


def pid_namespace() -> list[str] | None:
    """The `unshare` command that runs a process as PID 1 of a new PID namespace: as root, or as any
    user through a user namespace of its own (where the kernel allows those); None where neither works."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    for command in (["unshare", "--pid", "--fork"], ["unshare", "--user", "--map-root-user", "--pid", "--fork"]):
        if subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    return None


def test_sigterm_while_starting_ends_the_worker_even_as_pid_1(qsettings, tmp_path):
    """In a container `rq worker` is PID 1, which the kernel sends no signal it has no handler for,
    and RQ's handlers come only with work(): a pod deleted while its worker waits for Redis (or loads
    its model) must still stop, not sit out its grace period."""
    assert pid_namespace() is not None, (
        "needs `unshare --pid` (root) or `unshare --user --pid` (util-linux) to run the worker as PID 1")
    import subprocess
    from pathlib import Path
    import sys

    closed = f"redis://127.0.0.1:{free_ports(1)[0]}/0"  # nothing listens: the start-up rides out an outage
    env = worker_env(qsettings, closed, DEEPFAKE_REDIS_URL=closed, DEEPFAKE_REDIS_OUTAGE_S="120")
    log = tmp_path / "worker.log"
    rq = str(Path(sys.executable).parent / "rq")
    proc = subprocess.Popen([*pid_namespace(), "--kill-child", rq, "worker", "deepfake"], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "redis_unreachable" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "redis_unreachable" in log.read_text(), log.read_text()
        [child] = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()  # PID 1 inside
        os.kill(int(child), signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def misconfigured(qsettings, redis_server, tmp_path, **env: str) -> dict:
    """Start `rq worker` with `env`; it must exit 2 with no traceback: its one worker_misconfigured line."""
    log = tmp_path / "worker.log"
    proc = start_rq_worker(worker_env(qsettings, redis_server.url, **env), log)
    try:
        assert proc.wait(120) == 2, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()
    assert "Traceback" not in log.read_text(), lines[-20:]
    [said] = [json.loads(line) for line in lines if '"worker_misconfigured"' in line]
    assert said["level"] == "error", said
    return said


def test_a_worker_whose_model_cannot_load_exits_2_with_one_log_line(qsettings, redis_server, tmp_path,
                                                                    cut_model_dir):
    """A corrupt model (a copy cut short) stops the worker before it takes a job, saying so in one
    JSON line (the pod's logs), not a traceback of ONNX Runtime's."""
    cut = cut_model_dir
    said = misconfigured(qsettings, redis_server, tmp_path, DEEPFAKE_MODEL_DIR=str(cut))
    assert said["reason"].startswith(f"cannot load the model in {cut}: InvalidProtobuf")


@pytest.mark.parametrize("env, reason", [
    ({"DEEPFAKE_FRAMES": "abc", "DEEPFAKE_RESULT_TTL_S": "0"},
     "invalid settings: DEEPFAKE_FRAMES: Input should be a valid integer"),
    ({"DEEPFAKE_DETECTOR": "haar"}, "DEEPFAKE_DETECTOR 'haar': unknown face detector 'haar'"),
    # as the cpu and gpu overlays set it: the randomly initialised test model's card warns
    ({"DEEPFAKE_REQUIRE_VETTED_MODEL": "true"}, "DEEPFAKE_REQUIRE_VETTED_MODEL: the model "),
    ({"DEEPFAKE_DETECTOR_WEIGHTS": "/nonexistent/Resnet50_Final.pth"},
     "DEEPFAKE_DETECTOR 'retinaface-mobilenet' with DEEPFAKE_DETECTOR_WEIGHTS /nonexistent/Resnet50_Final.pth: "),
])
def test_a_worker_with_a_bad_setting_or_detector_exits_2_with_one_log_line(qsettings, redis_server, tmp_path, env,
                                                                           reason):
    """A setting that does not parse, or a detector that cannot load: RQ logged a plain-text traceback
    and exited 1. Every refused variable is named (pydantic's input never: it may be a secret)."""
    said = misconfigured(qsettings, redis_server, tmp_path, **env)
    assert said["reason"].startswith(reason), said
    if "DEEPFAKE_FRAMES" in env:
        assert "DEEPFAKE_RESULT_TTL_S: " in said["reason"] and "abc" not in said["reason"]


def test_a_stop_signal_is_kept_where_a_handler_catches_it_and_nothing_is_written_to_redis_from_it(tmp_path):
    """RQ's warm-stop handler raised StopRequested, an Exception, when idle: a webhook's handler in
    maintenance caught it and the worker went on taking jobs until its pod was killed. Busy, it wrote
    to Redis from inside the job: with Redis down that blocked the job, then raised inside it."""
    from redis import Redis
    from rq.exceptions import StopRequested
    from rq.worker.base import WorkerStatus
    from servers import RedisServer, stop

    from worker.rq_worker import DeepfakeWorker

    server = RedisServer.start(tmp_path)
    try:
        idle = DeepfakeWorker(["deepfake"], connection=Redis.from_url(server.url))
        busy = DeepfakeWorker(["deepfake"], connection=Redis.from_url(server.url))
    finally:
        stop(server.proc)  # gone: any write from the handler would wait out the outage
    idle._state, busy._state = WorkerStatus.IDLE, WorkerStatus.BUSY
    with pytest.raises(StopRequested):  # idle: the work loop's wait ends at once
        idle._shutdown()
    assert idle._stop_requested  # and where a handler in its way catches that, the loop stops at its next turn
    started = time.monotonic()
    busy._shutdown()
    assert busy._stop_requested and time.monotonic() - started < 10  # a write would wait out the 120 s ride-out
