"""Logging (worker/logging.py): JSON lines on whatever sys.stderr is when a line is written, and a
failing log stream never fails the work that logs."""
from __future__ import annotations

import io
import json
import logging
import sys

import pytest
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


def test_rq_lines_are_rendered_like_ours_on_stderr_even_after_rq_set_its_handlers(monkeypatch):
    """`rq worker` gives its logger plain-text handlers before the worker class is made; the worker's
    scheduler and RQ's bootstrap try again later. Every line must still be one JSON object."""
    from rq.logutils import setup_loghandlers

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    setup_loghandlers("INFO", name="rq.worker")  # what the `rq worker` command does first
    configure_logging("json", "INFO")
    setup_loghandlers("INFO", name="rq.scheduler")  # RQScheduler() and Worker.bootstrap(), afterwards
    worker, scheduler = logging.getLogger("rq.worker"), logging.getLogger("rq.scheduler")
    worker.info("Worker %s: started with PID %d", "w1", 7)
    scheduler.debug("below the level")
    try:
        raise ValueError("bad job")
    except ValueError:
        worker.error("Traceback follows", exc_info=True)
    scheduler.info("Scheduler: working again")
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert out.getvalue() == ""
    assert [(r["event"], r["level"], r["logger"]) for r in lines] == [
        ("Worker w1: started with PID 7", "info", "rq.worker"), ("Traceback follows", "error", "rq.worker"),
        ("Scheduler: working again", "info", "rq.scheduler")]
    assert "ValueError: bad job" in lines[1]["exception"] and all("timestamp" in r for r in lines)
    configure_logging("json", "WARNING")  # again, as each command does: still one handler, the new level
    worker.info("quiet now")
    worker.warning("loud")
    assert [json.loads(line)["event"] for line in err.getvalue().splitlines()[3:]] == ["loud"]


def test_the_worker_modules_standard_logging_lines_are_json_at_the_worker_level(monkeypatch):
    """The engines log with the standard library (a TensorRT build "takes minutes", an option an
    engine drops): those lines came out as plain text through Python's last-resort handler, and the
    INFO ones not at all."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    configure_logging("json", "INFO")
    engine, library = logging.getLogger("worker.engine.tensorrt_engine"), logging.getLogger("some.library")
    engine.info("building a TensorRT engine (this takes minutes)")
    engine.debug("below the level")
    library.info("a library's chatter, below its own level")
    library.warning("a library's warning")
    configure_logging("json", "INFO")  # again, as each command does: one handler still
    engine.warning("engine 'onnxruntime' does not support channels_last; ignoring it")
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [(r["event"], r["level"], r["logger"]) for r in lines] == [
        ("building a TensorRT engine (this takes minutes)", "info", "worker.engine.tensorrt_engine"),
        ("a library's warning", "warning", "some.library"),
        ("engine 'onnxruntime' does not support channels_last; ignoring it", "warning", "worker.engine.tensorrt_engine")]
    configure_logging("json", "WARNING")
    engine.info("quiet now")
    assert len(err.getvalue().splitlines()) == 3


@pytest.mark.parametrize("setting, flag, shown, hidden", [
    ("WARNING", None, set(), {"debug", "info"}),  # DEEPFAKE_LOG_LEVEL quiets RQ's chatter too
    ("WARNING", "DEBUG", {"debug", "info"}, set()),  # `rq worker --logging_level DEBUG` (or -v) wins
])
def test_the_worker_logs_rq_lines_at_the_level_it_is_given(redis, settings, moderator, capsys, setting, flag,
                                                            shown, hidden):
    from worker.rq_worker import DeepfakeWorker
    from worker.runtime import WorkerRuntime, install

    worker = DeepfakeWorker(["levels"], connection=redis)
    worker.runtime = WorkerRuntime(settings.model_copy(update={"log_format": "json", "log_level": setting,
                                                               "metrics_port": 0}), moderator=moderator)
    install(worker.runtime)
    capsys.readouterr()
    worker.work(burst=True, **({"logging_level": flag} if flag else {}))
    levels = {line["level"] for line in map(json.loads, capsys.readouterr().err.splitlines())
              if line.get("logger", "").startswith("rq.")}
    assert shown <= levels and not hidden & levels, levels


def test_lines_logged_in_the_prefetch_thread_carry_the_jobs_context(monkeypatch):
    """Decoding runs ahead of detection in a thread of its own: its lines (an HDR frame not converted,
    botocore's retries of a GET) carried no job_id, which the worker binds for the job."""
    from worker.prefetch import prefetch

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    configure_logging("json", "INFO")
    log = structlog.get_logger("test")

    def frames():
        for i in range(3):
            log.warning("decoded_in_thread", i=i)
            logging.getLogger("botocore.retryhandler").warning("a retry")  # a library's line, same thread
            yield i

    with structlog.contextvars.bound_contextvars(job_id="J1"):
        assert list(prefetch(frames())) == [0, 1, 2]
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert len(lines) == 6 and all(line.get("job_id") == "J1" for line in lines), lines
