"""structlog set-up: JSON lines in production, readable console output on a terminal; always stderr."""
from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """sys.stderr as it is when a line is written, not when logging was configured (a stream swapped
    later, by a test's capture or a supervisor's redirect, still gets the lines). A stream that fails
    (closed, a broken pipe to a dead log collector) loses the line instead of failing the job that
    logged it, as the standard logging module does."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
