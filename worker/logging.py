"""structlog set-up: JSON lines in production, readable console output on a terminal; always stderr.

RQ's own lines (a worker starting, its scheduler, a job's traceback) go the same way: RQ gives its
loggers plain-text handlers, INFO on stdout and errors on stderr, a traceback spread over many
lines, which a log collector reading JSON lines cannot parse."""
from __future__ import annotations

import logging
import sys
from typing import Any

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


class _RQLogHandler(logging.StreamHandler):
    """The one handler of RQ's loggers (the `rq` logger, which the others propagate to)."""


class _StdlibLogHandler(logging.StreamHandler):
    """The root logger's handler: the standard-logging lines of this worker's own modules (the model
    engines': a TensorRT build "takes minutes", an option an engine drops) and of libraries' warnings."""


def _handler(cls: type[logging.StreamHandler], renderer: Any, level: str) -> logging.StreamHandler:
    handler = cls(_CurrentStderr())  # type: ignore[arg-type]
    handler.setLevel(logging.getLevelName(level.upper()))
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    return handler


def _route_stdlib_logs(renderer: Any, level: str) -> None:
    """Standard-logging lines through `renderer`: this worker's modules' (the `worker` logger) at
    `level` or above, other libraries' at their own level (WARNING unless they set one). Without it
    they went to Python's last-resort handler, plain text, and an engine's INFO lines nowhere."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibLogHandler)]:
        root.removeHandler(old)
    root.addHandler(_handler(_StdlibLogHandler, renderer, level))
    logging.getLogger("worker").setLevel(logging.getLevelName(level.upper()))


def _route_rq_logs(renderer: Any, level: str) -> None:
    """RQ's loggers through `renderer`, at `level` or above (it sets its own loggers' levels, from
    `rq worker --logging-level`). RQ adds its plain-text handlers only to a logger that has no
    handler above it, so a scheduler or worker set up after this adds none; those the `rq` command
    added before are taken off."""
    from rq.logutils import ColorizingStreamHandler

    handler = _handler(_RQLogHandler, renderer, level)
    root = logging.getLogger("rq")
    for old in [h for h in root.handlers if isinstance(h, _RQLogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.propagate = False  # not again through whatever handlers the root logger has
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("rq.") and isinstance(logger, logging.Logger):
            for old in [h for h in logger.handlers if isinstance(h, ColorizingStreamHandler)]:
                logger.removeHandler(old)
            logger.propagate = True


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    _route_rq_logs(renderer, level)
    _route_stdlib_logs(renderer, level)
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
