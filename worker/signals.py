"""SIGTERM where no handler would otherwise act on it: the process must still stop, cleanly.

In a container `rq worker` is PID 1, and the kernel drops a signal that PID 1 has no handler for.
RQ installs its SIGTERM handler only when `work()` begins, after the model has loaded (and, with an
unreachable Redis, after the start-up ride-out), so until then a pod being deleted would sit out its
whole grace period, holding its GPU. No job is held yet at that point: exiting at once loses nothing.

The `deepfake` commands take the same handler: as SystemExit, a SIGTERM (a CronJob's deadline, say)
runs `finally` blocks, so the queue's maintenance lock taken by `deepfake status` is released.
"""
from __future__ import annotations

import signal
import sys
from typing import Any

EXIT_ON_SIGTERM = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _exit(signum: int, frame: Any) -> None:
    sys.exit(EXIT_ON_SIGTERM)


def exit_on_sigterm() -> None:
    """Exit (SystemExit) on SIGTERM from now on, until someone else sets a handler (RQ's `work()`).
    Another handler already set is left alone, and so is a thread other than the main one (which
    cannot set handlers)."""
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _exit)
    except ValueError:  # not the main thread
        pass
