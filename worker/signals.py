"""SIGTERM before RQ's warm-shutdown handlers exist: the worker must still stop.

In a container `rq worker` is PID 1, and the kernel drops a signal that PID 1 has no handler for.
RQ installs its SIGTERM handler only when `work()` begins, after the model has loaded (and, with an
unreachable Redis, after the start-up ride-out), so until then a pod being deleted would sit out its
whole grace period, holding its GPU. No job is held yet at that point: exiting at once loses nothing.
"""
from __future__ import annotations

import signal
import sys
from typing import Any

EXIT_ON_SIGTERM = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _exit(signum: int, frame: Any) -> None:
    sys.exit(EXIT_ON_SIGTERM)


def exit_on_sigterm_until_work() -> None:
    """Exit on SIGTERM from now until RQ's `work()` replaces the handler. Another handler already set
    is left alone, and so is a thread other than the main one (which cannot set handlers)."""
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _exit)
    except ValueError:  # not the main thread
        pass
