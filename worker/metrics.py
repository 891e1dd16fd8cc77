"""Prometheus metrics and the health endpoint, served on one port by a daemon thread.

`/metrics`: jobs by status and action, decision scores, the shadow model's actions and failures, stage
latency, faces and frames per video, damaged packets skipped, queue wait, job attempts that raised,
webhooks, how long the worker has waited for a full Redis, and what Redis holds at scrape time
(waiting, running and failed jobs, the age of the oldest waiting one, its memory against maxmemory).
`/healthz`: 200 while the model is loaded and the worker's heartbeat is fresh or it waits for a full
Redis, 503 otherwise (the Kubernetes probe). deploy/components/monitoring alerts on these.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis

from worker.decision import ALLOW, BLOCK, REVIEW
from worker.errors import ErrorCode

SCRAPE_TIMEOUT_S = 2.0  # per Redis call made while Prometheus scrapes the queue's state
# Label values, each exported at 0 from the start: a series first scraped above 0 (a pod KEDA started
# whose first job counted before the first scrape) shows no increase() to the alerts. A verdict read
# back from S3 (a lost write race) is anyone's who can write there: other values count as "other".
STATUSES = ("ok", "no_face", "error", "reused")
ACTIONS = (ALLOW, REVIEW, BLOCK)
ERROR_CODES = tuple(code.value for code in ErrorCode)
STAGES = ("open", "decode", "detect", "crop", "model", "shadow", "total", "store")
WEBHOOK_OUTCOMES = ("sent", "refused", "failed")
FAILURE_REASONS = ("storage", "refused", "stopped", "internal")
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ... 1.0
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The worker's metrics in their own registry (no process-global state to collide in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("deepfake_jobs_total", "Finished jobs by verdict status (ok, no_face, error, reused).",
                            ["status"], registry=self.registry)
        self.errors = Counter("deepfake_errors_total", "Error verdicts by code.", ["code"], registry=self.registry)
        self.shadow_actions = Counter(
            "deepfake_shadow_actions_total", "Scored verdicts by the production model's action and the shadow "
            "model's (DEEPFAKE_SHADOW_MODEL_DIR): what switching models would change.", ["action", "shadow_action"],
            registry=self.registry)
        self.shadow_failures = Counter(
            "deepfake_shadow_failures_total", "Scored jobs whose shadow model raised (logged as shadow_failed); "
            "their verdicts went on without a shadow block.", registry=self.registry)
        self.actions = Counter("deepfake_verdict_actions_total", "Verdicts by action (allow, review, block): "
                               "review is the human review queue's inflow.", ["action"], registry=self.registry)
        self.scores = Histogram(
            "deepfake_decision_score", "The score each scored verdict was decided on (decision.score). Its "
            "distribution drifting is the first sign that uploads changed (a new generator, a new codec) or that the "
            "model no longer fits them.", buckets=SCORE_BUCKETS, registry=self.registry)
        self.stage = Histogram("deepfake_stage_seconds", "Wall time per pipeline stage.", ["stage"],
                               buckets=STAGE_BUCKETS, registry=self.registry)
        self.faces = Histogram("deepfake_faces_per_video", "Faces detected per video.",
                               buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.frames = Histogram("deepfake_frames_per_video", "Frames sampled per decoded video (more on long "
                                "videos: DEEPFAKE_MAX_SAMPLE_GAP_S), what a video costs.",
                                buckets=(8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        self.damaged_packets = Counter("deepfake_damaged_packets_total", "Damaged packets the decoder skipped "
                                       "(video.decode_errors) in the videos it decoded.", registry=self.registry)
        self.queue_wait = Histogram("deepfake_queue_wait_seconds", "Time from enqueue to start.",
                                    buckets=STAGE_BUCKETS + (600, 1800, 3600), registry=self.registry)
        self.webhooks = Counter("deepfake_webhooks_total", "Webhook POSTs by outcome (sent, refused, failed).",
                                ["outcome"], registry=self.registry)
        self.model_loaded = Gauge("deepfake_model_loaded", "1 once the model is loaded.", registry=self.registry)
        self.redis_full = Gauge("deepfake_redis_full_seconds", "How long the worker has been waiting for Redis to "
                                "accept a write (0 when it is not): Redis is full (maxmemory with noeviction).",
                                registry=self.registry)
        self.job_failures = Counter(
            "deepfake_job_failures_total", "Job attempts that raised instead of returning a verdict, by reason "
            "(storage: S3 failed, RQ retries; refused: a job naming other code; stopped: on request; internal: a "
            "bug) and whether RQ retries the job.", ["reason", "retried"], registry=self.registry)
        for counter, label, values in ((self.jobs, "status", STATUSES), (self.actions, "action", ACTIONS),
                                       (self.errors, "code", ERROR_CODES),
                                       (self.webhooks, "outcome", WEBHOOK_OUTCOMES)):
            for value in values:
                counter.labels(**{label: value})
        for reason in FAILURE_REASONS:
            for retried in ("true", "false"):
                self.job_failures.labels(reason=reason, retried=retried)

    def watch_queues(self, connection, queues: list[str]) -> None:
        """Export the queues' state from Redis at each scrape (see QueueCollector)."""
        self.registry.register(QueueCollector(connection, queues))

    def observe_verdict(self, verdict: dict) -> None:
        self.jobs.labels(status=_known(verdict["status"], STATUSES)).inc()
        if verdict.get("action"):
            self.actions.labels(action=_known(verdict["action"], ACTIONS)).inc()
        if verdict.get("shadow"):
            self.shadow_actions.labels(action=_known(verdict["action"], ACTIONS),
                                       shadow_action=_known(verdict["shadow"]["action"], ACTIONS)).inc()
        if verdict.get("error"):
            self.errors.labels(code=_known(verdict["error"]["code"], ERROR_CODES)).inc()
        for stage, ms in (verdict.get("timings_ms") or {}).items():
            if stage in STAGES:
                self.stage.labels(stage=stage).observe(ms / 1000.0)
        if verdict["status"] in ("ok", "no_face"):
            self.faces.observe(len(verdict.get("faces") or []))
            video = verdict.get("video") or {}
            self.frames.observe(video.get("frames_sampled", 0))
            self.damaged_packets.inc(video.get("decode_errors", 0))
        if verdict["status"] == "ok" and isinstance((verdict.get("decision") or {}).get("score"), (int, float)):
            self.scores.observe(verdict["decision"]["score"])


def _known(value: object, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"  # type: ignore[return-value]


class QueueCollector(Collector):
    """The RQ queues as Redis holds them when Prometheus scrapes: jobs waiting, running and failed, and
    how long the oldest waiting job has waited; and Redis' memory against its maxmemory. Every worker
    exports the same values (alert on max).
    Failed jobs include those whose worker died mid-job (RQ moves them there), which no worker counts.
    With Redis unreachable the scrape still answers, without these series."""

    def __init__(self, connection, queues: list[str]) -> None:
        # A connection of its own with timeouts: a Redis that stops answering must not hang scrapes.
        pool = connection.connection_pool
        # Nor wait out a full or unreachable Redis as the worker's own client does (worker.redis_client).
        kwargs = {**pool.connection_kwargs, "socket_timeout": SCRAPE_TIMEOUT_S,
                  "socket_connect_timeout": SCRAPE_TIMEOUT_S}
        kwargs.pop("retry", None)
        # Plain redis.Redis: the worker's WaitingRedis puts its ride-out back as it is made, and a scrape
        # then waited the whole outage (120 s), not SCRAPE_TIMEOUT_S.
        self.connection = Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))
        self.queues = list(queues)

    def describe(self) -> list:
        return []  # collected live: nothing to check at registration, no Redis call then

    def collect(self):
        from worker.queue import queue_depths, redis_memory  # worker.queue imports this module (via rq_worker)

        jobs = GaugeMetricFamily("deepfake_queue_jobs", "Jobs in the RQ queue by state (queued: waiting; "
                                 "started: running; failed: in the failed registry; scheduled: retries waiting out their "
                                 "backoff).", labels=["queue", "state"])
        age = GaugeMetricFamily("deepfake_queue_oldest_job_age_seconds",
                                "How long the oldest waiting job has waited (0 when none waits).", labels=["queue"])
        used = GaugeMetricFamily("deepfake_redis_used_memory_bytes", "Memory Redis holds (INFO used_memory).")
        limit = GaugeMetricFamily("deepfake_redis_maxmemory_bytes", "Redis' maxmemory (0: none); under noeviction, "
                                  "writes are refused once used memory reaches it.")
        try:
            for name in self.queues:
                depths = queue_depths(self.connection, name)
                for state in ("queued", "started", "failed", "scheduled"):
                    jobs.add_metric([name, state], depths[state])
                age.add_metric([name], depths["oldest_waiting_s"])
            memory = redis_memory(self.connection)
            used.add_metric([], memory["used_bytes"])
            limit.add_metric([], memory["maxmemory_bytes"])
        except Exception:  # noqa: BLE001 - Redis down or a malformed job: /metrics still answers
            return
        yield jobs
        yield age
        yield used
        yield limit


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


class _DualStackServer(ThreadingHTTPServer):
    """Listens on IPv6 and IPv4 (mapped) at once: an IPv6-only pod network probes the pod's IPv6
    address, an IPv4 one its IPv4 address, and the image's HEALTHCHECK asks 127.0.0.1."""
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(metrics: Metrics, healthy: Callable[[], tuple[bool, str]], port: int,
          host: str | None = None) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on `port` of `host`; by default every address, IPv6 and IPv4
    (before 0.4.5 IPv4 only, so an IPv6 cluster's probes were refused), or IPv4 alone on a host
    without IPv6."""
    handler = type("Handler", (_Handler,), {"metrics": metrics, "healthy": staticmethod(healthy)})
    if host is not None:
        server = ThreadingHTTPServer((host, port), handler)
    else:
        try:
            server = _DualStackServer(("::", port), handler)
        except OSError as exc:
            if not socket.has_ipv6 or exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                server = ThreadingHTTPServer(("0.0.0.0", port), handler)  # IPv6 is off here
            else:
                raise
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def heartbeat_fresh(last_heartbeat: float | None, max_age_s: float, now: float | None = None) -> bool:
    return last_heartbeat is not None and (now or time.time()) - last_heartbeat <= max_age_s
