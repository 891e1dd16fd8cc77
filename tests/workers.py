"""Workers for the tests: an in-process burst worker (the class `rq worker deepfake` runs, on the
test's Redis), and supervised `rq worker deepfake` processes beside a crash-safe redis-server, for the
fault and soak tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from deploy_tools import CONNECTION_CLASS, WORKER_CLASS
from servers import wait_for_port

from worker.settings import Settings


def burst(redis: Any, settings: Any, moderator: Any = None, runtime: Any = None) -> Any:
    """Run DeepfakeWorker until its queue is empty, with `runtime` or one sharing the test's loaded
    `moderator`; returns the worker (its runtime's metrics, for one)."""
    from worker.rq_worker import DeepfakeWorker
    from worker.runtime import WorkerRuntime, install

    worker = DeepfakeWorker([settings.queue], connection=redis)
    worker.runtime = runtime or WorkerRuntime(settings, moderator=moderator)
    install(worker.runtime)
    worker.work(burst=True)
    return worker


def stored(s3, settings: Settings, key: str) -> list[dict]:
    """Every verdict object for `key` in the settings' one allowed bucket (there must be exactly one), parsed."""
    [bucket] = settings.bucket_allow_list()
    vkey = f"{settings.verdict_prefix}{key}.json"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=vkey).get("Contents", [])
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listed if o["Key"] == vkey]


def abandon(redis: Redis, job_id: str, queue: str = "deepfake") -> None:
    """What a worker killed mid-job leaves behind: the job started, in the started registry, its
    heartbeat long expired, and no worker left to finish it."""
    from rq.job import JobStatus

    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    Queue(queue, connection=redis, serializer=JSONSerializer).remove(job.id)
    job.set_status(JobStatus.STARTED)
    key = StartedJobRegistry(queue, connection=redis).key
    redis.zadd(key, {f"{job.id}:gone-worker-execution": time.time() - 60})  # its heartbeat ran out a minute ago


def queue_settings(model_dir: Path, redis_server: Any, s3_server: Any, tmp_path: Path, bucket: str,
                   **extra: Any) -> Settings:
    """A worker's settings on the test's servers: one allowed bucket, 8 frames, verdicts under a
    prefix of the test's own, no metrics port, JSON logs."""
    return Settings(model_dir=model_dir, redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint,
                    allowed_buckets=bucket, frames=8, metrics_port=0, log_format="json",
                    verdict_prefix=f"verdicts-{tmp_path.name}/", **extra)


def worker_env(settings: Settings, redis_url: str, **overrides: str) -> dict[str, str]:
    """The environment of `rq worker deepfake` as the image and the manifests set it, on `settings`."""
    return {
        **os.environ, "RQ_REDIS_URL": redis_url, "RQ_WORKER_CLASS": WORKER_CLASS,
        "RQ_JOB_CLASS": "worker.rq_worker.DeepfakeJob", "RQ_CONNECTION_CLASS": CONNECTION_CLASS,
        "DEEPFAKE_MODEL_DIR": str(settings.model_dir), "DEEPFAKE_ALLOWED_BUCKETS": settings.allowed_buckets,
        "DEEPFAKE_S3_ENDPOINT_URL": settings.s3_endpoint_url, "DEEPFAKE_VERDICT_PREFIX": settings.verdict_prefix,
        "DEEPFAKE_JOB_RETRIES": str(settings.job_retries), "DEEPFAKE_LOG_FORMAT": "json", "DEEPFAKE_METRICS_PORT": "0",
        **overrides,
    }


def start_rq_worker(env: dict[str, str], log: Path, queue: str = "deepfake", *extra: str) -> subprocess.Popen:
    """The real `rq worker` command, as users and the manifests run it, in its own process group."""
    rq = str(Path(sys.executable).parent / "rq")
    return subprocess.Popen([rq, "worker", queue, *extra], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@dataclass
class DurableRedis:
    """A redis-server whose every write is fsynced to an append-only file, so a restart is a real
    crash-and-recover (the suite's shared Redis keeps nothing on disk)."""

    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "DurableRedis":
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 10, self.proc)
        return self

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@dataclass
class Supervisor:
    """Real `rq worker deepfake` processes, each restarted when it exits, as Kubernetes would; and RQ's
    own abandoned-job handling run for jobs whose worker died (what maintenance does once their
    heartbeat expires), never for a job a live worker holds."""

    settings: Settings
    redis_url: str
    logdir: Path
    count: int = 2
    env: dict = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: int = 0
    recovered: int = 0  # started jobs whose worker died or lost them, requeued
    unclaimed: int = 0  # jobs left in the intermediate list by a dequeue whose reply was lost, requeued
    _gen: int = 0
    _seen: dict = field(default_factory=dict)

    def _spawn(self, slot: int) -> None:
        self._gen += 1
        name = f"w{slot}-{self._gen}"
        env = worker_env(self.settings, self.redis_url, **{"DEEPFAKE_FRAMES": "4", "OMP_NUM_THREADS": "1", **self.env})
        self.procs[name] = start_rq_worker(env, self.logdir / f"{name}.log", self.settings.queue, "--name", name)

    def start(self) -> "Supervisor":
        for slot in range(self.count):
            self._spawn(slot)
        return self

    def alive(self) -> set[str]:
        return {name for name, p in self.procs.items() if p.poll() is None}

    def tend(self, redis: Redis) -> None:
        """Restart exited workers; requeue jobs their worker no longer runs."""
        for name, p in list(self.procs.items()):
            if p.poll() is not None and not name.endswith("-done"):
                self.procs[f"{name}-done"] = self.procs.pop(name)
                self.restarts += 1
                self._spawn(int(name[1:].split("-")[0]))
        try:
            self._requeue_abandoned(redis)
            self._requeue_stuck_intermediate(redis)
        except Exception:  # noqa: BLE001 - Redis may be down right now; try again next round
            pass

    def _running(self, redis: Redis, name: str | None) -> bool:
        """Whether worker `name` is alive and busy (so the job it holds is really running)."""
        from rq import Worker

        if not name or name not in self.alive():
            return False
        worker = Worker.find_by_key(f"{Worker.redis_worker_namespace_prefix}{name}", connection=redis)
        return worker is not None and worker.get_state() != "idle"

    @staticmethod
    def _holder(redis: Redis, entry: str) -> str | None:
        """The worker that runs a started-registry entry (`job_id:execution_id`): its execution's, which
        RQ writes with the entry and the worker's busy state in one transaction. The job's own
        `worker_name` is written later, by the work horse: read between the two, it said nobody, and
        a job a live worker had just taken was requeued."""
        job_id, _, execution_id = entry.partition(":")
        name = redis.hget(f"rq:execution:{job_id}:{execution_id}", "worker_name")
        if name:
            return name.decode()
        try:
            return Job.fetch(job_id, connection=redis, serializer=JSONSerializer).worker_name  # an entry without one
        except NoSuchJobError:
            return None  # the job is gone: RQ's cleanup drops its entry

    def _requeue_abandoned(self, redis: Redis) -> None:
        """RQ's StartedJobRegistry.cleanup, as maintenance runs it once a dead worker's heartbeat has
        expired, for the entries (and only those) whose worker died or went idle without finishing.
        Counted: the jobs the cleanup took out of `started` (an entry left by a job that finished is
        dropped, not recovered)."""
        registry = StartedJobRegistry(self.settings.queue, connection=redis, serializer=JSONSerializer)
        entries = redis.zrange(registry.key, 0, -1, withscores=True)
        if not entries:
            return
        abandoned = {}
        for raw, score in entries:
            if self._running(redis, self._holder(redis, raw.decode())):
                return  # a live job among them: wait, the cleanup below would take it too
            job_id = raw.decode().split(":")[0]
            abandoned[job_id] = score
        started = {j for j in abandoned if _status(redis, j) == "started"}
        registry.cleanup(timestamp=max(abandoned.values()) + 0.001)  # entries added after the snapshot stay
        self.recovered += sum(_status(redis, j) != "started" for j in started)

    def _requeue_stuck_intermediate(self, redis: Redis) -> None:
        """A job moved to RQ's intermediate list by a worker that died before registering it: what
        IntermediateQueue.cleanup does after a minute, done at once when no live worker holds it."""
        queue = Queue(self.settings.queue, connection=redis, serializer=JSONSerializer)
        key = queue.intermediate_queue_key
        started = {e.split(":")[0] for e in StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)}
        now = time.monotonic()
        for raw in redis.lrange(key, 0, -1):
            job_id = raw.decode()
            if job_id in started:
                continue
            # A live worker registers a job milliseconds after taking it, or, when Redis failed in
            # between, at its next try: at most the ride-out's longest wait (8 s) after Redis is back.
            if now - self._seen.setdefault(job_id, now) < 12.0:
                continue
            job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
            redis.lrem(key, 1, job_id)
            queue.enqueue_job(job)
            self._seen.pop(job_id)
            self.unclaimed += 1

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def logs(self, tail: int | None = 1500) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-tail if tail else 0:]}"
                         for p in sorted(self.logdir.glob("*.log")))


def _status(redis: Redis, job_id: str) -> str | None:
    try:
        return str(Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status().value)
    except NoSuchJobError:
        return None


def wait_until_final(redis_factory, job_ids, supervisor: Supervisor, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            redis = redis_factory()
            statuses = {j: str(Job.fetch(j, connection=redis, serializer=JSONSerializer).get_status().value)
                        for j in job_ids}
            if all(s in ("finished", "failed") for s in statuses.values()):
                return statuses
            supervisor.tend(redis)
        except Exception:  # noqa: BLE001 - Redis down: keep waiting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"jobs not final after {timeout} s: {statuses}\n{supervisor.logs()}")
