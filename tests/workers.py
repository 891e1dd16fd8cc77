"""An in-process burst worker for the tests: the class `rq worker deepfake` runs, on the test's Redis."""
from __future__ import annotations

from typing import Any


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
