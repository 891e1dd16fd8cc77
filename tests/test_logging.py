"""Logging (worker/logging.py): JSON lines on whatever sys.stderr is when a line is written, and a
failing log stream never fails the work that logs."""
from __future__ import annotations

import io
import json
import sys

import structlog

from worker.logging import configure_logging


def test_lines_go_to_the_current_stderr_and_a_broken_one_is_survived(monkeypatch):
    configure_logging("json", "INFO")
    log = structlog.get_logger("test")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.info("stage_done", stage="decode", ms=12.5)
    monkeypatch.setattr(sys, "stderr", second)  # swapped after configuration: the next line follows it
    log.warning("second")
    assert json.loads(first.getvalue())["event"] == "stage_done" and json.loads(first.getvalue())["ms"] == 12.5
    assert json.loads(second.getvalue())["level"] == "warning"
    second.close()
    log.info("into a closed stream")  # dropped, not raised
    log.debug("below the level")
    monkeypatch.setattr(sys, "stderr", third := io.StringIO())
    log.info("back")
    assert [json.loads(line)["event"] for line in third.getvalue().splitlines()] == ["back"]
