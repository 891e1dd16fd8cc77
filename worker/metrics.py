"""Prometheus metrics and the health endpoint, served on one port by a daemon thread.

`/metrics`: jobs by status, stage latency, faces per video, queue wait. `/healthz`: 200 while the
model is loaded and the worker's heartbeat is fresh, 503 otherwise (the Kubernetes probe).
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The worker's metrics in their own registry (no process-global state to collide in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("deepfake_jobs_total", "Finished jobs by verdict status (ok, no_face, error, reused).",
                            ["status"], registry=self.registry)
        self.errors = Counter("deepfake_errors_total", "Error verdicts by code.", ["code"], registry=self.registry)
        self.stage = Histogram("deepfake_stage_seconds", "Wall time per pipeline stage.", ["stage"],
                               buckets=STAGE_BUCKETS, registry=self.registry)
        self.faces = Histogram("deepfake_faces_per_video", "Faces detected per video.",
                               buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue_wait = Histogram("deepfake_queue_wait_seconds", "Time from enqueue to start.",
                                    buckets=STAGE_BUCKETS + (600, 1800, 3600), registry=self.registry)
        self.webhooks = Counter("deepfake_webhooks_total", "Webhook POSTs by outcome (sent, refused, failed).",
                                ["outcome"], registry=self.registry)
        self.model_loaded = Gauge("deepfake_model_loaded", "1 once the model is loaded.", registry=self.registry)

    def observe_verdict(self, verdict: dict) -> None:
        self.jobs.labels(status=verdict["status"]).inc()
        if verdict.get("error"):
            self.errors.labels(code=verdict["error"]["code"]).inc()
        for stage, ms in (verdict.get("timings_ms") or {}).items():
            self.stage.labels(stage=stage).observe(ms / 1000.0)
        if verdict["status"] in ("ok", "no_face"):
            self.faces.observe(len(verdict.get("faces") or []))


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    healthy: Callable[[], tuple[bool, str]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/metrics"):
            body, status, ctype = generate_latest(self.metrics.registry), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            ok, reason = self.healthy()
            body, status, ctype = reason.encode(), 200 if ok else 503, "text/plain"
        else:
            body, status, ctype = b"not found", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet: probes hit this every few seconds
        pass


def serve(metrics: Metrics, healthy: Callable[[], tuple[bool, str]], port: int,
          host: str = "0.0.0.0") -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"metrics": metrics, "healthy": staticmethod(healthy)})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def heartbeat_fresh(last_heartbeat: float | None, max_age_s: float, now: float | None = None) -> bool:
    return last_heartbeat is not None and (now or time.time()) - last_heartbeat <= max_age_s
