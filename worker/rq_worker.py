"""`DeepfakeWorker`: what `rq worker deepfake` runs (RQ_WORKER_CLASS=worker.rq_worker.DeepfakeWorker).

- Loads the detector and model once, in the worker process, before the first job, and runs jobs
  in that process (a SimpleWorker: no fork per job, so CUDA state survives and nothing reloads).
- Forces RQ's JSON serializer: a pickled job is never unpickled, so Redis access is not code execution.
- Serves /metrics and /healthz, and publishes the model it runs so enqueuers can deduplicate.
"""
from __future__ import annotations

import json
import time
from typing import Any

from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from worker.logging import configure_logging
from worker.metrics import heartbeat_fresh, serve
from worker.runtime import WorkerRuntime, install
from worker.settings import Settings


def model_key(queue: str) -> str:
    return f"deepfake:model:{queue}"


class DeepfakeWorker(SimpleWorker):
    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        items = queues if isinstance(queues, (list, tuple)) else [queues]
        names = [q.name if isinstance(q, Queue) else q for q in items]
        if kwargs.get("connection") is None and items and isinstance(items[0], Queue):
            kwargs["connection"] = items[0].connection
        super().__init__(names, *args, **kwargs)
        self.runtime: WorkerRuntime | None = None
        self._http = None
        self._job_started: float | None = None
        self._job_timeout: float = 0.0
        self._beat: float | None = None

    # -- start-up --------------------------------------------------------------------------------
    def work(self, *args: Any, **kwargs: Any) -> bool:
        self.load_runtime()
        return super().work(*args, **kwargs)

    def load_runtime(self, settings: Settings | None = None) -> WorkerRuntime:
        if self.runtime is None:
            settings = settings or Settings()
            configure_logging(settings.log_format, settings.log_level)
            self.runtime = WorkerRuntime(settings)
            install(self.runtime)
            self.runtime.metrics.model_loaded.set(1)
            for q in self.queues:
                self.connection.set(model_key(q.name), json.dumps(self.runtime.model))
            if settings.metrics_port and self._http is None:
                self._http = serve(self.runtime.metrics, self.health, settings.metrics_port)
        return self.runtime

    # -- health ----------------------------------------------------------------------------------
    def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
        self._beat = time.time()
        return super().heartbeat(*args, **kwargs)

    def execute_job(self, job: Any, queue: Any) -> Any:
        self._job_started, self._job_timeout = time.time(), float(job.timeout or 0)
        try:
            return super().execute_job(job, queue)
        finally:
            self._job_started = None
            self._beat = time.time()

    def health(self) -> tuple[bool, str]:
        """Model loaded, and either a fresh heartbeat or a job still inside its time limit."""
        if self.runtime is None:
            return False, "model not loaded"
        now = time.time()
        if self._job_started is not None:
            if now - self._job_started <= self._job_timeout + 60:
                return True, "busy"
            return False, f"job running for {now - self._job_started:.0f} s, past its limit"
        if heartbeat_fresh(self._beat, self.worker_ttl + 60, now):
            return True, "idle"
        return False, "heartbeat stale"

    def teardown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
        super().teardown()
