"""`deepfake check`: what a worker needs, checked before it takes a job.

A misconfigured worker otherwise shows up as failed or refused jobs minutes later: an empty bucket
allow-list refuses every upload, a wrong S3 key fails every read, a model directory without its card
stops the pod in a crash loop. Each check runs on its own, says in one line what it found, and never
raises; `ok` False means a worker with these settings would not do its job.
"""
from __future__ import annotations

import importlib
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Collection

import numpy as np

from worker.engine.base import BadModelOutput, checked_probabilities
from worker.settings import DEFAULT_QUEUE, Settings

CHECKS = ("model", "redis", "rq", "s3", "webhooks", "signing")
NETWORK_TIMEOUT_S = 5.0
NEARLY_FULL = 0.85  # of maxmemory: warned of, as DeepfakeRedisNearlyFull alerts
# RQ dates a running job's registry entry by its worker's clock (its limit + 60 s ahead), and each
# cleaner compares it with its own: one running that far ahead of a worker takes its running job
# for abandoned and retries or fails it while it still runs.
CLOCK_SKEW_S = 10.0
_wall_clock = time.time  # this machine's clock, compared with Redis' (a test moves it)
RQ_DEFAULT_URL = "redis://localhost:6379/0"  # what `rq worker` connects to when RQ_REDIS_URL is unset
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "warning": self.warning,
                "seconds": round(self.seconds, 2)}


def _scores_one_crop(engine) -> str | None:  # type: ignore[no-untyped-def]
    """None when the engine gives one probability for one grey crop of its input size, else what is wrong."""
    size = engine.card.input_size
    try:
        checked_probabilities(engine.predict(np.full((1, size, size, 3), 128, np.uint8)), 1)
    except BadModelOutput as exc:
        return str(exc)
    return None


def check_model(settings: Settings) -> Check:
    """The model and the detector load on the configured device and score a crop and a frame."""
    from worker.pipeline import Moderator

    moderator = Moderator(settings)
    if (wrong := _scores_one_crop(moderator.engine)) is not None:
        return Check("model", False, f"scoring one crop: {wrong}")
    moderator.detector.detect(np.zeros((1, 64, 64, 3), np.uint8))
    block = moderator.model_block
    recipe = moderator.recipe
    warnings = [block["warning"]] if block.get("warning") else []
    if trained := moderator.engine.card.other_detector(moderator.detector.name):
        warnings.append(f"the model's training faces were found by {trained}, this worker's by "
                        f"{moderator.detector.name}: its crops will differ a little from those it learnt from")
    detail = (f"{block['name']} {block['version']} on {block['backend']} (sha256 {block['sha256'][:12]}), "
              f"detector {settings.detector} on {settings.device}, crops {recipe.size} px at {recipe.scale}×")
    if moderator.shadow is not None:  # a candidate that does not score would fail every scored job
        if (wrong := _scores_one_crop(moderator.shadow.engine)) is not None:
            return Check("model", False, f"the shadow model, scoring one crop: {wrong}")
        shadow = moderator.shadow.engine.describe()
        detail += f", shadow {shadow['name']} {shadow['version']} (sha256 {shadow['sha256'][:12]})"
    return Check("model", True, detail, "; ".join(warnings) or None)


def check_redis(settings: Settings) -> Check:
    """Redis answers; warns when it would lose or evict the queue, or is nearly full. Read from INFO,
    which managed Redis allows where CONFIG is disabled."""
    from redis import Redis
    from redis.exceptions import ResponseError

    from worker.queue import queue_depths, redis_memory

    connection = Redis.from_url(settings.redis_url, socket_timeout=NETWORK_TIMEOUT_S,
                                socket_connect_timeout=NETWORK_TIMEOUT_S)
    connection.ping()
    skew = clock_skew_s(connection)
    version = connection.info("server").get("redis_version", "?")
    depths = queue_depths(connection, settings.queue)
    detail = (f"Redis {version}, queue {settings.queue!r}: {depths['queued']} waiting, {depths['started']} running, "
              f"{depths['scheduled']} retries waiting out their backoff, {depths['failed']} failed")
    warnings = []
    if skew is not None and abs(skew) > CLOCK_SKEW_S:
        warnings.append(f"this machine's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} Redis': "
                        "RQ dates running jobs by each worker's clock, and a cleaner a minute ahead of a worker "
                        "takes its running job for abandoned; keep every clock synchronised (NTP)")
    try:
        aof = int(connection.info("persistence").get("aof_enabled", 0))
        memory = redis_memory(connection)
    except ResponseError:  # INFO renamed away: nothing to judge by
        return Check("redis", True, detail, "cannot read INFO: make sure the queue is persisted (appendonly), "
                     "capped (maxmemory) and never evicted (noeviction)")
    if not aof:
        warnings.append("appendonly is off: a Redis restart loses the queued jobs (README, 'The queue worker', Redis)")
    used, limit, policy = memory["used_bytes"], memory["maxmemory_bytes"], memory["policy"]
    if not limit:
        # It grows until the host or its memory limit kills it: a crash, and without persistence a loss.
        warnings.append("no maxmemory: a Redis that outgrows its memory is killed instead of refusing writes; "
                        "set maxmemory below its memory limit, with noeviction (docs/deploy.md, When Redis is full)")
    elif policy != "noeviction":
        # A full Redis then deletes keys to make room: queued jobs, results and duplicate records
        # vanish without an error. noeviction refuses writes instead, which enqueuers see.
        warnings.append(f"maxmemory-policy is {policy} with maxmemory {limit} bytes: a full Redis evicts "
                        "queued jobs and results; use noeviction (README, Job results in Redis)")
    elif memory["counted_bytes"] >= limit:  # it refuses writes now: enqueues fail, workers wait with their jobs
        return Check("redis", False, f"{detail}; Redis is full: it holds {used / 2**20:.1f} MiB of its "
                     f"{limit / 2**20:.1f} MiB maxmemory and refuses writes; free memory or raise maxmemory "
                     "(docs/deploy.md, When Redis is full)", "; ".join(warnings) or None)
    elif used >= NEARLY_FULL * limit:
        warnings.append(f"Redis holds {used / limit:.0%} of its maxmemory: at 100% it refuses writes; raise "
                        "maxmemory or keep results for less time (docs/deploy.md, When Redis is full)")
    memory_detail = f"{used / 2**20:.1f} MiB" + (f" of {limit / 2**20:.0f} MiB" if limit else ", no maxmemory")
    return Check("redis", True, f"{detail}; {memory_detail}", "; ".join(warnings) or None)


def clock_skew_s(connection) -> float | None:  # type: ignore[no-untyped-def]
    """How far this machine's clock runs ahead of the Redis server's (negative: behind), to within
    half a round trip; None where TIME is not allowed."""
    from redis.exceptions import ResponseError

    before = _wall_clock()
    try:
        seconds, micros = connection.time()
    except ResponseError:
        return None
    after = _wall_clock()
    return (before + after) / 2 - (seconds + micros / 1e6)


def _import_class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _names_subclass(variable: str, base: type) -> tuple[str, bool]:
    """(the variable's value, whether it names `base` or a subclass of it); unset or not importable: False."""
    dotted = os.environ.get(variable, "")
    try:
        return dotted, bool(dotted) and issubclass(_import_class(dotted), base)
    except (ImportError, AttributeError, ValueError, TypeError):
        return dotted, False


def check_rq(settings: Settings) -> Check:
    """The environment `rq worker deepfake` reads (not its command-line flags) starts this worker on
    the Redis the enqueuers use. Without RQ_WORKER_CLASS, RQ's own Worker cannot read the JSON jobs
    (every one fails with DeserializationError) and would call any function a job names."""
    from worker.redis_client import WaitingRedis, database_address, without_password
    from worker.rq_worker import DeepfakeJob, DeepfakeWorker

    wanted = f"{DeepfakeWorker.__module__}.{DeepfakeWorker.__name__}"
    dotted = os.environ.get("RQ_WORKER_CLASS", "")
    if not dotted:
        return Check("rq", False, f"RQ_WORKER_CLASS is unset: `rq worker` would run RQ's own Worker, which fails "
                     f"every job (it cannot read their JSON) and runs any function a job names; set it to {wanted}")
    try:
        worker_class = _import_class(dotted)
    except (ImportError, AttributeError, ValueError) as exc:
        return Check("rq", False, f"RQ_WORKER_CLASS={dotted} does not import: {type(exc).__name__}: {exc}")
    if not (isinstance(worker_class, type) and issubclass(worker_class, DeepfakeWorker)):
        return Check("rq", False, f"RQ_WORKER_CLASS={dotted} is not {wanted} (nor a subclass): "
                     "it cannot read these JSON jobs safely")
    rq_url = os.environ.get("RQ_REDIS_URL") or RQ_DEFAULT_URL
    try:
        same = database_address(rq_url) == database_address(settings.redis_url)
    except ValueError as exc:
        return Check("rq", False, f"RQ_REDIS_URL: {exc}")
    if not same:
        told = "RQ_REDIS_URL" if os.environ.get("RQ_REDIS_URL") else "RQ_REDIS_URL is unset, so RQ's default"
        return Check("rq", False, f"{told} {without_password(rq_url)} is not DEEPFAKE_REDIS_URL "
                     f"{without_password(settings.redis_url)}: the worker would listen where no job is queued")
    warnings = []
    connection, waits = _names_subclass("RQ_CONNECTION_CLASS", WaitingRedis)
    if not waits:
        warnings.append(f"RQ_CONNECTION_CLASS is {connection or 'unset'}, not worker.redis_client.WaitingRedis: a "
                        "full or restarting Redis makes the worker exit with its job in hand")
    job_class, vetted = _names_subclass("RQ_JOB_CLASS", DeepfakeJob)
    if not vetted:
        warnings.append(f"RQ_JOB_CLASS is {job_class or 'unset'}, not worker.rq_worker.DeepfakeJob: `rq info` run "
                        "here would fail abandoned jobs through RQ's own Job and POST their webhooks unvetted, unsigned")
    if os.environ.get("RQ_CONFIG"):
        warnings.append("RQ_CONFIG is set: Redis settings in that module were not compared")
    if settings.queue != DEFAULT_QUEUE:  # the image's command and deploy/ name the default
        warnings.append(f"DEEPFAKE_QUEUE is {settings.queue!r}: jobs go to a queue the image's `rq worker "
                        f"{DEFAULT_QUEUE}` does not listen on; start the workers as `rq worker {settings.queue}` "
                        f"and set KEDA's listName to rq:queue:{settings.queue}")
    return Check("rq", True, f"rq worker runs {dotted} on {without_password(rq_url)}", "; ".join(warnings) or None)


def check_s3(settings: Settings) -> Check:
    """The credentials reach every allowed bucket (and the verdict bucket); an empty allow-list is an error."""
    from botocore.exceptions import BotoCoreError, ClientError

    from worker.s3 import control_client, error_code

    allowed = settings.bucket_allow_list()
    if not allowed:
        return Check("s3", False, "DEEPFAKE_ALLOWED_BUCKETS is empty: every job would be refused (access_denied)")
    buckets = sorted(b for b in allowed if b != "*")
    if settings.verdict_bucket and settings.verdict_bucket not in buckets:
        buckets.append(settings.verdict_bucket)
    client = control_client(settings.s3_endpoint_url, settings.s3_region)
    problems = []
    for bucket in buckets:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = error_code(exc)
            why = {"404": "does not exist", "NoSuchBucket": "does not exist", "403": "access denied"}.get(code, code)
            problems.append(f"{bucket}: {why}")
        except BotoCoreError as exc:
            problems.append(f"{bucket}: {exc}")
    if not buckets:  # `*` alone names no bucket: that the endpoint answers at all is still checked
        try:
            client.list_buckets()
        except ClientError:
            pass  # it answered (a refusal of ListAllMyBuckets is an answer)
        except BotoCoreError as exc:
            problems.append(str(exc))
    where = settings.s3_endpoint_url or "AWS"
    if problems:
        return Check("s3", False, f"{where}: " + "; ".join(problems))
    warning = "DEEPFAKE_ALLOWED_BUCKETS=* lets a job name any bucket these credentials reach" if "*" in allowed else None
    detail = f"{', '.join(buckets)} reachable with these credentials" if buckets else "answers (no bucket named to look at)"
    return Check("s3", True, f"{where}: {detail}", warning)


def check_webhooks(settings: Settings) -> Check:
    """DEEPFAKE_WEBHOOK_HOSTS names hosts, .domain suffixes, IPs or CIDRs; anything else (a URL, a
    port) would never match a receiver, so every webhook would be refused."""
    from worker.webhooks import HostPolicy

    policy = HostPolicy.parse(settings.webhook_hosts)
    if not policy.restricted:
        return Check("webhooks", True, "receivers: any host whose every address is public")
    bad = sorted(n for n in (*policy.names, *(s[1:] for s in policy.suffixes)) if not _HOST_NAME.fullmatch(n))
    if bad:
        return Check("webhooks", False, f"DEEPFAKE_WEBHOOK_HOSTS: not a host name, .suffix, IP or CIDR: {', '.join(bad)}")
    return Check("webhooks", True, f"receivers: only {settings.webhook_hosts}")


def check_signing(settings: Settings) -> Check:
    if settings.verdict_secret is None:
        return Check("signing", True, "stored verdicts are not signed",
                     "set DEEPFAKE_VERDICT_SECRET: unsigned, a verdict planted in S3 would be reused (docs/security.md)")
    return Check("signing", True, "stored verdicts are signed and verified before reuse")


_RUNNERS: dict[str, Callable[[Settings], Check]] = {
    "model": check_model, "redis": check_redis, "rq": check_rq, "s3": check_s3, "webhooks": check_webhooks, "signing": check_signing,
}


def run_checks(settings: Settings, only: Collection[str] | None = None) -> list[Check]:
    """Every check (or those named in `only`), each timed; an exception is that check's failure."""
    results = []
    for name in CHECKS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result = _RUNNERS[name](settings)
        except Exception as exc:  # noqa: BLE001 - reported as the check's failure, with its type
            result = Check(name, False, f"{type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - t0
        results.append(result)
    return results
