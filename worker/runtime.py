"""One worker process's loaded state: settings, the moderator (detector + model), S3 and the verdict store.

The RQ worker class builds it once at start-up and installs it with `install()`; a job running in a
process without one (a plain forking `rq worker`) builds its own on first use.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from botocore.exceptions import BotoCoreError, ClientError

from worker import __version__
from worker.errors import AccessDenied, Interrupted, ModerationError, Timeout, TransientError, Unsupported
from worker.metrics import Metrics
from worker.s3 import (NOT_FOUND_CODES, S3Location, S3Source, bucket_allowed, described, error_code, make_client,
                       validate_location)
from worker.settings import Settings
from worker.verdict import error_verdict
from worker.verdict_store import VerdictStore, input_etag, reusable
from worker.video import MAX_SAMPLED_FRAMES

if TYPE_CHECKING:  # the pipeline (torch, PyAV, the detector) loads with a worker's first runtime, not with
    from worker.pipeline import Moderator  # the queue code that imports this module (clients, `deepfake status`)

log = structlog.get_logger("worker.runtime")

# A decode that timed out having spent more than this share of its limit waiting on S3, with GETs
# slower than this on average, is a storage problem, retried by RQ, not a `timeout` verdict about the
# upload. The average keeps a file built to seek all over (many quick GETs) from dodging its verdict:
# an uploader chooses the number of reads, not how long the store takes to answer one.
STORAGE_SHARE_OF_TIMEOUT, SLOW_GET_S = 0.5, 1.0
MAX_JOB_FRAMES = MAX_SAMPLED_FRAMES  # the bound Settings.frames has; a job's own `frames` is held to it too


def valid_frames(frames: object) -> bool:
    """Whether a job's `frames` is one the worker accepts: an integer from 1 to MAX_JOB_FRAMES."""
    return not isinstance(frames, bool) and isinstance(frames, int) and 1 <= frames <= MAX_JOB_FRAMES


class InvalidJobArguments(ValueError):
    """A job whose arguments are not the documented types: a client's bug, which a retry repeats."""


def check_job_arguments(bucket: object, key: object, frames: object) -> None:
    """A job's arguments come from whoever wrote to Redis: refuse anything but the documented types.

    `frames` sizes the sampling lists and the model batch: 10**9 would exhaust the worker's memory.
    A bad argument fails the job (a client bug, not a property of the upload): no verdict is written.
    """
    if not isinstance(bucket, str) or not isinstance(key, str):
        raise InvalidJobArguments("bucket and key must be strings")
    if frames is not None and not valid_frames(frames):
        raise InvalidJobArguments(f"frames must be an integer from 1 to {MAX_JOB_FRAMES}, not {frames!r}")


class WorkerRuntime:
    def __init__(self, settings: Settings, *, moderator: Moderator | None = None, s3_client: Any = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        if moderator is None:
            from worker.pipeline import Moderator

            moderator = Moderator(settings)
        self.moderator = moderator
        self.s3 = s3_client or make_client(settings.s3_endpoint_url, settings.s3_region)
        self.store = VerdictStore.for_settings(settings, self.s3, verify=True)
        self.allowed = settings.bucket_allow_list()
        self.metrics = metrics or Metrics()
        self.loaded_at = time.time()
        self.source: S3Source | None = None  # the upload being read, for a job stopped at its time limit
        self.stored: dict | None = None  # the verdict the last `_store` wrote (or found written)

    @property
    def model(self) -> dict:
        return self.moderator.model_block

    def published(self) -> dict:
        """What the worker publishes in Redis for enqueuers and `deepfake status`: the model block, the
        decision policy, the sampling gap and the worker's version (duplicates are matched on all four)."""
        shadow = self.moderator.shadow
        return {**self.model, "decision_policy": self.moderator.policy.published(),
                "max_sample_gap_s": self.settings.max_sample_gap_s, "worker_version": __version__,
                **({"shadow_model": shadow.engine.describe()} if shadow is not None else {})}

    def moderate_s3(self, bucket: str, key: str, *, frames: int | None = None, job_id: str | None = None,
                    enqueued_at: float | None = None, final_attempt: bool = False) -> dict:
        """The verdict for s3://bucket/key: reused when stored for the same bytes and model, else computed.

        Input problems end in an error verdict; storage outages raise TransientError so RQ retries.
        A timeout spent waiting on a slow store raises too, except on the job's `final_attempt`: then
        it is the `timeout` verdict, so no upload ends without one (whatever reads it is built to cost).
        """
        try:
            return self._moderate_s3(bucket, key, frames=frames, job_id=job_id, enqueued_at=enqueued_at,
                                     final_attempt=final_attempt)
        except (ClientError, BotoCoreError) as exc:
            # Reading or writing the verdict or report: an outage, throttling or a missing permission,
            # counted and retried as storage (0.4.5 counted it `internal`: "a bug").
            raise TransientError(f"the verdict store failed for s3://{bucket}/{key}: {described(exc)}") from exc

    def _moderate_s3(self, bucket: str, key: str, *, frames: int | None, job_id: str | None,
                     enqueued_at: float | None, final_attempt: bool) -> dict:
        self.source = None
        check_job_arguments(bucket, key, frames)
        frames = frames or self.settings.frames
        uri = f"s3://{bucket}/{key}"
        bound = log.bind(job_id=job_id, source=uri)
        if enqueued_at is not None:
            self.metrics.queue_wait.observe(max(0.0, time.time() - enqueued_at))
        try:
            validate_location(bucket, key)
        except ValueError as exc:
            return self._finish(self._error(uri, AccessDenied(str(exc))), bound)
        upload = S3Location(bucket, key)
        if self.store.is_verdict_key(upload):
            err = AccessDenied(f"{uri} is inside the verdict prefix {self.settings.verdict_prefix!r}")
            return self._finish(self._error(uri, err), bound)
        unstorable = self.store.unstorable(upload) if self.allows(bucket) else None
        if unstorable:  # no verdict of its own could be written: reviewed, not retried
            return self._finish(self._error(uri, Unsupported(f"{uri}: {unstorable}")), bound)
        try:
            source = self.source = S3Source.resolve(self.s3, upload, max_bytes=self.settings.max_bytes,
                                                    allowed_buckets=self.allowed)
        except ModerationError as exc:
            verdict = self._error(uri, exc)
            if exc.code.value == "access_denied":
                return self._finish(verdict, bound)  # never write where the worker may not read
            # Refused bytes (too large) replace a verdict stored for other bytes at this key, never one
            # for these same bytes (a lowered size limit); a missing upload keeps its last verdict
            # (write-once).
            refused = getattr(exc, "etag", None)
            stored, stored_etag = self.store.get(upload)
            replaces = stored_etag if refused is not None and input_etag(stored or {}) not in (None, refused) else None
            return self._store(upload, verdict, replaces, bound, etag=refused)
        stored, stored_etag = self.store.get(upload)
        if reusable(stored, etag=source.etag, model_sha256=self.model["sha256"], frames=frames,
                    max_sample_gap_s=self.settings.max_sample_gap_s, policy=self.moderator.policy):
            bound.info("verdict_reused", etag=source.etag)
            self.metrics.jobs.labels(status="reused").inc()  # its scores and actions were counted when made
            bound.info("job_done", status=stored["status"], **_error_fields(stored), reused=True)
            return {**stored, "stored_at": self.store.location_for(upload).uri}  # type: ignore[dict-item]
        report_dir = Path(tempfile.mkdtemp(prefix="deepfake-report-")) if self.settings.upload_reports else None
        try:
            try:
                verdict = self.moderator.moderate(source, frames=frames, report_dir=report_dir)
            except Interrupted as exc:  # the time limit fell in a read, and PyAV passed on what came of it
                raise exc.reason from None
            if self.moderator.shadow is not None and verdict["status"] == "ok" and "shadow" not in verdict:
                self.metrics.shadow_failures.inc()  # the shadow model raised (logged): the verdict went on
            if source.interrupt is not None:  # the time limit fell in a read, and FFmpeg took it for the end
                raise source.interrupt
            failure = source.read_error
            if failure is None and (verdict.get("error") or {}).get("code") == "timeout" and not final_attempt:
                failure = self.slow_store(self.moderator.limits.decode_timeout_s)
            if isinstance(failure, TransientError):
                raise failure  # the storage failed, not the upload: RQ retries, nothing is written
            if report_dir is not None and verdict.get("report") and failure is None:
                verdict["report"] = self.store.put_report(upload, report_dir)
        finally:
            if report_dir is not None:
                shutil.rmtree(report_dir, ignore_errors=True)
        if isinstance(failure, AccessDenied):
            return self._finish(self._error(uri, failure), bound)  # never write where the worker may not read
        if failure is not None:  # deleted (not_found) or replaced (corrupt) while it was read
            verdict = self._error(uri, failure, timings_ms=verdict.get("timings_ms"))
        verdict["input"] = {"bucket": bucket, "key": key, "etag": source.etag, "size": source.size, "frames": frames,
                            "max_sample_gap_s": self.settings.max_sample_gap_s}
        return self._store(upload, verdict, stored_etag, bound, etag=source.etag)

    def slow_store(self, limit_s: float) -> TransientError | None:
        """The error to retry on when reading the upload took most of a time limit, in GETs slower than
        a healthy store's (None: the time went elsewhere, or on many quick GETs the file asked for)."""
        source = self.source
        if source is None:
            return None
        waited = source.io_s
        if waited > STORAGE_SHARE_OF_TIMEOUT * limit_s and waited > SLOW_GET_S * max(1, source.requests):
            return TransientError(f"reading {source.uri} ran out of time: {waited:.0f} s of the {limit_s:.0f} s "
                                  f"limit waiting on S3 in {source.requests} GETs, a slow store, not the upload")
        return None

    def timeout_verdict(self, bucket: str, key: str, seconds: int, *, store: bool = True) -> dict:
        """The verdict for a job RQ stopped at its time limit, stored like any other final verdict (it
        used to be the job's result only, leaving no verdict in S3); with `store` False, only returned
        (the store did not answer in time). A timeout is never reused: the next job for the key tries again."""
        uri = f"s3://{bucket}/{key}"
        verdict = self._error(uri, Timeout(f"the job ran past its {seconds} s limit"))
        bound = log.bind(source=uri)
        self.stored = None
        if not store:
            return self._finish(verdict, bound)
        try:
            validate_location(bucket, key)
            upload = S3Location(bucket, key)
            if self.store.is_verdict_key(upload) or not self.allows(bucket) or self.store.unstorable(upload):
                return self._finish(verdict, bound)  # where the job itself would store nothing
            stored, stored_etag = self.store.get(upload)
            current = self._current_etag(upload)
            if stored is not None and current is not None and reusable(
                    stored, etag=current, model_sha256=self.model["sha256"],
                    frames=(stored.get("input") or {}).get("frames"),
                    max_sample_gap_s=self.settings.max_sample_gap_s, policy=self.moderator.policy):
                bound.info("timeout_verdict_not_needed", etag=current)  # another job judged these bytes
                return self._finish({**stored, "stored_at": self.store.location_for(upload).uri}, bound)
            # A stale verdict (other bytes, model or policy) is replaced; a deleted upload's is kept.
            return self._store(upload, verdict, stored_etag if current is not None else None, bound, etag=current)
        except Exception:  # noqa: BLE001 - the verdict is still the job's result
            bound.exception("timeout_verdict_not_stored")
            return self._finish(verdict, bound)

    def allows(self, bucket: str) -> bool:
        """Whether the bucket is in the worker's allow-list (DEEPFAKE_ALLOWED_BUCKETS)."""
        return bucket_allowed(self.allowed, bucket)

    def _error(self, uri: str, exc: ModerationError, *, timings_ms: dict | None = None) -> dict:
        """An error verdict with the decision policy's action for its code, and the card's threshold
        (as every verdict of this model carries it, labelled or not)."""
        return error_verdict(uri, exc, action=self.moderator.policy.error_action(exc.code.value),
                             threshold=self.moderator.threshold, model=self.model, timings_ms=timings_ms)

    def _current_etag(self, upload: S3Location) -> str | None:
        """The ETag of what is at the key now (None: nothing is); a failed HEAD raises for RQ to retry."""
        try:
            return self.s3.head_object(Bucket=upload.bucket, Key=upload.key)["ETag"]
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return None
            raise TransientError(f"HEAD {upload.uri} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise TransientError(f"HEAD {upload.uri} failed: {exc}") from exc

    def _answers(self, verdict: dict, etag: str, frames: int) -> bool:
        """Whether `verdict` is a final answer for the bytes with `etag` as this worker asks the question
        (its model, policy and sample gap, and `frames`), as a stored verdict must be to be reused."""
        return reusable(verdict, etag=etag, model_sha256=self.model["sha256"], frames=frames,
                        max_sample_gap_s=self.settings.max_sample_gap_s, policy=self.moderator.policy)

    def _store(self, upload: S3Location, verdict: dict, stored_etag: str | None, bound, *,
               etag: str | None = None) -> dict:
        """Write the verdict for the bytes with `etag` (None: about no bytes, a missing upload's: it
        never replaces another's verdict, so a deleted upload keeps its last one)."""
        t0 = time.perf_counter()
        written = self.store.put(upload, verdict, replaces=stored_etag)
        if not written:
            # Another worker wrote first: its verdict stands, and this job returns that one, if it is
            # about the bytes at the key now. One about earlier bytes (the upload was replaced, and a
            # job for the old bytes wrote last) is replaced, as is one that does not verify (written by
            # someone else), on the ETag just read: a replaced video never keeps an old clearance.
            theirs, their_etag = self.store.get(upload)
            bound.info("verdict_race_lost")
            if theirs is not None and etag is not None and input_etag(theirs) != etag \
                    and self._current_etag(upload) == etag:
                bound.info("verdict_for_earlier_bytes_replaced", theirs=input_etag(theirs), ours=etag)
                theirs = None
            elif theirs is not None and etag is not None and input_etag(theirs) == etag \
                    and (frames := (verdict.get("input") or {}).get("frames")) \
                    and self._answers(verdict, etag, frames) and not self._answers(theirs, etag, frames):
                # The same bytes asked another question (other frames, model or policy: a rolling update,
                # an enqueue with --frames): theirs is replaced by this job's final answer, as a stored
                # verdict read before scoring would have been, not returned as this job's (0.4.5 did).
                bound.info("verdict_for_another_question_replaced", theirs_frames=(theirs.get("input") or {}).get("frames"))
                theirs = None
            if theirs is None and their_etag is not None and self.store.put(upload, verdict, replaces=their_etag):
                theirs = verdict
            verdict = theirs or verdict
        verdict.setdefault("timings_ms", {})["store"] = round((time.perf_counter() - t0) * 1000.0, 1)
        verdict["stored_at"] = self.store.location_for(upload).uri
        self.stored = verdict
        return self._finish(verdict, bound)

    def _finish(self, verdict: dict, bound) -> dict:
        self.metrics.observe_verdict(verdict)
        bound.info("job_done", status=verdict["status"], **_error_fields(verdict), timings_ms=verdict.get("timings_ms"))
        return verdict


def _error_fields(verdict: dict) -> dict:
    """An error verdict's code and message for its `job_done` line: `access_denied` alone did not say
    whether the allow-list or S3's policy refused, and refusals are not stored in S3 to be read."""
    error = verdict.get("error") or {}
    return {"code": error.get("code"), **({"error": error["message"]} if error.get("message") else {})}


_runtime: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def installed() -> WorkerRuntime | None:
    """The runtime a worker installed, if this process is one (never built on demand)."""
    return _runtime


def current() -> WorkerRuntime:
    """The installed runtime, or one built from the environment on first use."""
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(Settings())
    return _runtime
