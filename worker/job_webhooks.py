"""Sending a finished or failed job's webhooks (worker.rq_worker.DeepfakeJob.send_webhooks), and
remembering which were not delivered.

A webhook is tried once. One that failed (the receiver down, a timeout, a non-2xx answer), or whose
worker died while sending it (each is noted before it is sent, the note taken back once it is
delivered or refused: a kill after RQ saved the result but before the POST lost it for good), is noted
beside its job, as a sha256 digest of its URL (a URL's query may hold a token), for as long as the
job's result: enqueueing the upload again with the same webhook then makes a new job, which reuses the
stored verdict and sends it, where a duplicate would otherwise be answered by the finished job and the
receiver never hear (worker.queue.enqueue). A refused one is not noted: the workers' host policy would
refuse it again. A later delivery to the same URL (the job requeued) takes the note back."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlsplit

import structlog
from redis import Redis
from rq.defaults import DEFAULT_FAILURE_TTL, DEFAULT_RESULT_TTL
from rq.job import JobStatus

from worker.runtime import installed
from worker.settings import MAX_RESULT_TTL_S, Settings
from worker.webhooks import MAX_WEBHOOKS, HostPolicy, WebhookFailed, WebhookRefused, deliver, summary

if TYPE_CHECKING:
    from rq.job import Job

log = structlog.get_logger("worker.job_webhooks")
UNDELIVERED_PREFIX = "deepfake:webhook-undelivered:"


def _source(job: Job) -> str | None:
    """The s3:// URI the job names, where its arguments are the two strings a job's are."""
    try:
        args = job.args
    except Exception:  # noqa: BLE001 - arguments anyone could have written
        return None
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return f"s3://{args[0]}/{args[1]}"
    return None


def undelivered_key(job_id: str) -> str:
    return UNDELIVERED_PREFIX + job_id


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def record_undelivered(connection: Redis, job_id: str, urls: Iterable[str], ttl_s: int) -> None:
    """Note `urls` as not delivered for `job_id`, for `ttl_s` seconds."""
    digests = sorted({url_digest(u) for u in urls})
    if digests:
        with connection.pipeline(transaction=True) as pipe:
            pipe.sadd(undelivered_key(job_id), *digests).expire(undelivered_key(job_id), max(int(ttl_s), 1))
            pipe.execute()


def record_delivered(connection: Redis, job_id: str, url: str) -> None:
    connection.srem(undelivered_key(job_id), url_digest(url))


def was_undelivered(connection: Redis, job_id: str, url: str) -> bool:
    """Whether `job_id` tried `url` and did not deliver it."""
    return bool(connection.sismember(undelivered_key(job_id), url_digest(url)))


def send_job_webhooks(job: "Job", status: Any, exc_string: str | None) -> None:
    """See DeepfakeJob.send_webhooks; nothing escapes this."""
    hooks = [w for w in job.webhooks[:MAX_WEBHOOKS] if w.job_status == status]
    extra = sum(w.job_status == status for w in job.webhooks[MAX_WEBHOOKS:])
    if not hooks:
        return
    rt = installed()
    if extra:  # only a raw enqueue can attach more (the Python one attaches two)
        log.warning("webhooks_skipped", job_id=job.id, skipped=extra, limit=MAX_WEBHOOKS)
        if rt is not None:
            rt.metrics.webhooks.labels(outcome="refused").inc(extra)
    try:
        s = rt.settings if rt is not None else Settings()
        status = JobStatus(status).value
        policy = HostPolicy.parse(s.webhook_hosts)
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
        payload = summary(job.id, status, job._result if status == "finished" else None, exc_string,  # noqa: SLF001
                          job.enqueued_at.isoformat() if job.enqueued_at else None,
                          job.ended_at.isoformat() if job.ended_at else None, source=_source(job))
    except Exception as exc:  # noqa: BLE001 - settings or a result nobody can send
        log.warning("webhook_failed", job_id=job.id, error_type=type(exc).__name__, reason="no payload")
        if rt is not None:
            rt.metrics.webhooks.labels(outcome="failed").inc(len(hooks))
        _note(job, failed=[h.url for h in hooks], sent=[], status=status)
        return
    _note(job, failed=[h.url for h in hooks], sent=[], status=status)  # until each is delivered or refused
    failed, settled = [], []
    for hook in hooks:
        host = None
        try:
            host = urlsplit(hook.url).hostname  # never the path or query: they may hold a token
            outcome = deliver(hook.url, payload, policy=policy, secret=secret, headers=hook.headers,
                              timeout_s=min(float(hook.timeout), s.webhook_timeout_s))
            log.info("webhook_sent", job_id=job.id, host=host, status=status)
        except WebhookRefused as exc:
            outcome = "refused"
            log.warning("webhook_refused", job_id=job.id, host=host, reason=str(exc))
        except WebhookFailed as exc:
            outcome = "failed"
            log.warning("webhook_failed", job_id=job.id, host=host, reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever one hook's URL or headers provoke; its message may quote them
            outcome = "failed"
            log.warning("webhook_failed", job_id=job.id, host=host, error_type=type(exc).__name__,
                        reason=f"unexpected {type(exc).__name__}")
        if rt is not None:
            rt.metrics.webhooks.labels(outcome=outcome).inc()
        # the note is taken back for a refused one too: the workers' host policy would refuse it again
        (settled if outcome in ("sent", "refused") else failed).append(hook.url)
    _note(job, failed=failed, sent=settled, status=status)


def _note(job: "Job", *, failed: list[str], sent: list[str], status: Any) -> None:
    """Note the failed URLs for as long as the job's result or failure is kept (RQ's defaults when the
    job names none; a year at most, for one kept for ever); take back the note of any URL delivered now."""
    try:
        if status == JobStatus.FINISHED:
            ttl = DEFAULT_RESULT_TTL if job.result_ttl is None else job.result_ttl
        else:
            ttl = DEFAULT_FAILURE_TTL if job.failure_ttl is None else job.failure_ttl
        if failed:
            record_undelivered(job.connection, job.id, failed, MAX_RESULT_TTL_S if ttl < 0 else min(max(ttl, 1), MAX_RESULT_TTL_S))
        for url in sent:
            record_delivered(job.connection, job.id, url)
    except Exception as exc:  # noqa: BLE001 - nothing may escape (see DeepfakeJob.send_webhooks)
        log.warning("webhook_outcome_unrecorded", job_id=job.id, error_type=type(exc).__name__)
