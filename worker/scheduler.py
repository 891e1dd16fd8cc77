"""The scheduler each `rq worker deepfake` runs: RQ's, which moves the retries whose backoff wait is
over (`DEEPFAKE_JOB_RETRY_BACKOFF_S`) from the queue's scheduled registry back onto the queue.

RQ forks it from the worker; one scheduler per queue holds the queue's lock and does the work. What
differs from RQ's:
- Every worker starts one (`DeepfakeWorker._start_scheduler`), not only the worker that got the lock:
  the others try for it every 2 minutes (RQ's own retry in the scheduler's loop), so retries go on
  soon after the lock holder dies. RQ's other workers would try at their next maintenance, 10
  minutes or more away.
- It rides out Redis outages as its worker does. RQ's dies at the first refused connection, and
  its worker starts another only at its next maintenance.
- The worker starts it before the model loads (`DeepfakeWorker.work`), so the forked process holds
  no model, CUDA context or threads; only a restart after it died forks from a loaded worker.
- It ends when its worker is gone. RQ's runs on, holding the lock and heartbeating, when the worker
  was killed (SIGKILL, OOM) outside a container, where nothing else ends it.

With no worker running (KEDA at zero), `deepfake status` does its work (`worker.queue.release_due_retries`).
"""
from __future__ import annotations

import os
import time
from typing import Any

from redis.exceptions import ConnectionError, TimeoutError
from rq.scheduler import RQScheduler


class RetryScheduler(RQScheduler):
    """RQ's scheduler, which waits out Redis outages and stops (releasing its lock) once the worker
    that forked it has gone."""

    _parent_pid: int | None = None

    def start(self) -> Any:
        self._parent_pid = os.getpid()
        return super().start()

    def worker_gone(self) -> bool:
        """A new parent means the worker died and this process was re-parented (to init or a subreaper)."""
        return self._parent_pid is not None and os.getppid() != self._parent_pid

    def work(self) -> None:
        """RQ's loop (lock, heartbeat, move what is due, sleep), going on through Redis errors."""
        self._install_signal_handlers()
        born, outage_since = False, None
        while not self._stop_requested:
            if self.worker_gone():
                self.log.warning("Scheduler: worker %s is gone, stopping", self._parent_pid)
                break
            try:
                if not born:
                    self.register_birth()
                    born = True
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
                if outage_since is not None:
                    self.log.info("Scheduler: Redis reachable again after %.0f s", time.monotonic() - outage_since)
                    outage_since = None
            except (ConnectionError, TimeoutError) as exc:
                if outage_since is None:
                    outage_since = time.monotonic()
                    self.log.warning("Scheduler: Redis unreachable (%s), retrying", exc)
            time.sleep(self.interval)
        try:
            self.stop()  # releases the lock, so another worker's scheduler takes over at once
        except (ConnectionError, TimeoutError):
            pass  # the lock expires by itself within a minute
