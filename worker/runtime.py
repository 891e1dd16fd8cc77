"""One worker process's loaded state: settings, the moderator (detector + model), S3 and the verdict store.

The RQ worker class builds it once at start-up and installs it with `install()`; a job running in a
process without one (a plain forking `rq worker`) builds its own on first use.
"""
from __future__ import annotations

import time
from typing import Any

import structlog

from worker.errors import AccessDenied, ModerationError, Timeout
from worker.metrics import Metrics
from worker.pipeline import Moderator
from worker.s3 import S3Location, S3Source, make_client, validate_location
from worker.settings import Settings
from worker.verdict import error_verdict
from worker.verdict_store import VerdictStore, reusable

log = structlog.get_logger("worker.runtime")


class WorkerRuntime:
    def __init__(self, settings: Settings, *, moderator: Moderator | None = None, s3_client: Any = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.moderator = moderator or Moderator(settings)
        self.s3 = s3_client or make_client(settings.s3_endpoint_url, settings.s3_region)
        self.store = VerdictStore(self.s3, prefix=settings.verdict_prefix, bucket=settings.verdict_bucket)
        self.allowed = settings.bucket_allow_list()
        self.metrics = metrics or Metrics()
        self.loaded_at = time.time()

    @property
    def model(self) -> dict:
        return self.moderator.model_block

    def moderate_s3(self, bucket: str, key: str, *, frames: int | None = None, job_id: str | None = None,
                    enqueued_at: float | None = None) -> dict:
        """The verdict for s3://bucket/key: reused when stored for the same bytes and model, else computed.

        Input problems end in an error verdict; storage outages raise TransientError so RQ retries.
        """
        frames = frames or self.settings.frames
        uri = f"s3://{bucket}/{key}"
        bound = log.bind(job_id=job_id, source=uri)
        if enqueued_at is not None:
            self.metrics.queue_wait.observe(max(0.0, time.time() - enqueued_at))
        try:
            validate_location(bucket, key)
        except ValueError as exc:
            return self._finish(error_verdict(uri, AccessDenied(str(exc)), threshold=None, model=self.model), bound)
        upload = S3Location(bucket, key)
        if self.store.is_verdict_key(upload):
            err = AccessDenied(f"{uri} is inside the verdict prefix {self.settings.verdict_prefix!r}")
            return self._finish(error_verdict(uri, err, threshold=None, model=self.model), bound)
        try:
            source = S3Source.resolve(self.s3, upload, max_bytes=self.settings.max_bytes, allowed_buckets=self.allowed)
        except ModerationError as exc:
            verdict = error_verdict(uri, exc, threshold=self.moderator.threshold, model=self.model)
            if exc.code.value == "access_denied":
                return self._finish(verdict, bound)  # never write where the worker may not read
            return self._store(upload, verdict, None, bound)
        stored, stored_etag = self.store.get(upload)
        if reusable(stored, etag=source.etag, model_sha256=self.model["sha256"], frames=frames):
            bound.info("verdict_reused", etag=source.etag)
            self.metrics.jobs.labels(status="reused").inc()
            return stored  # type: ignore[return-value]
        verdict = self.moderator.moderate(source, frames=frames)
        verdict["input"] = {"bucket": bucket, "key": key, "etag": source.etag, "size": source.size, "frames": frames}
        return self._store(upload, verdict, stored_etag, bound)

    def timeout_verdict(self, bucket: str, key: str, seconds: int) -> dict:
        uri = f"s3://{bucket}/{key}"
        return error_verdict(uri, Timeout(f"the job ran past its {seconds} s limit"), threshold=None, model=self.model)

    def _store(self, upload: S3Location, verdict: dict, stored_etag: str | None, bound) -> dict:
        t0 = time.perf_counter()
        written = self.store.put(upload, verdict, replaces=stored_etag)
        if not written:
            # Another worker wrote first: its verdict stands, and this job returns that one.
            theirs, _ = self.store.get(upload)
            bound.info("verdict_race_lost")
            verdict = theirs or verdict
        verdict.setdefault("timings_ms", {})["store"] = round((time.perf_counter() - t0) * 1000.0, 1)
        verdict["stored_at"] = self.store.location_for(upload).uri
        return self._finish(verdict, bound)

    def _finish(self, verdict: dict, bound) -> dict:
        self.metrics.observe_verdict(verdict)
        bound.info("job_done", status=verdict["status"], code=(verdict.get("error") or {}).get("code"))
        return verdict


_runtime: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current() -> WorkerRuntime:
    """The installed runtime, or one built from the environment on first use."""
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(Settings())
    return _runtime
