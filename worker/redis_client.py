"""The worker's Redis client: it waits out a full Redis and rides out a short outage, job in hand.

RQ lets both errors escape. A worker finishing a job when Redis refuses the write or drops the
connection exits with the job still marked started: it runs again only once its heartbeat has
expired and a worker's maintenance has found it (up to the job timeout plus 10 minutes later), and
the pod reloads its model. At start-up `rq worker` exits before loading anything, and Kubernetes
restarts it in a loop. The worker's client instead:

- **Full** (`maxmemory` reached under `noeviction`, what `deepfake check` asks for): Redis refuses
  writes, and any command inside a transaction, with an OOM error. The client runs a refused command
  again after 1 s, doubling to 30 s, for as long as Redis stays full. A refused command changed
  nothing (Redis discards a whole transaction that held one, and refuses a script only before its
  first write), so running it again is safe. Neither RQ nor this worker writes through a pipeline that
  is not a transaction, where a refusal could follow a write that went through.
- **Unreachable** (a restart, a failover, a dropped connection, the dataset loading, a primary demoted
  to a replica that answers writes with READONLY): the client
  reconnects and runs the command again after 0.5 s, doubling to 8 s, until `DEEPFAKE_REDIS_OUTAGE_S`
  (120 s) have passed, then raises as before. A command whose reply was lost may have run: RQ's
  writes run again harmlessly (statuses, registry moves and expiries are set, not added; a job moved
  twice off the queue is found by RQ's intermediate-queue cleanup; a worker's counters may count one
  job twice). A wrong password or a refused command is raised at once.

Inside a WATCH, redis-py raises WatchError instead of retrying (after the wait, for a full Redis),
and RQ starts that step over. Logged: `redis_full` / `redis_space_back`, `redis_unreachable` /
`redis_reachable`. While Redis is full the worker's /healthz stays up (a restart cannot free Redis)
and `deepfake_redis_full_seconds` says how long it has waited.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, OutOfMemoryError, ReadOnlyError
from redis.retry import Retry

from worker.logging import configure_logging
from worker.settings import Settings
from worker.signals import exit_on_sigterm

log = structlog.get_logger("worker.redis_client")

T = TypeVar("T")
FULL_FIRST_WAIT_S, FULL_MAX_WAIT_S = 1.0, 30.0
OUTAGE_FIRST_WAIT_S, OUTAGE_MAX_WAIT_S = 0.5, 8.0
SLACK_S = 10.0
DEFAULT_OUTAGE_S = 120.0


def doubling(first: float, most: float, attempt: int) -> float:
    return min(first * 2 ** min(attempt - 1, 16), most)


@dataclass
class FullClock:
    """A client's wait for Redis space, shared by its pooled connections. Over once no refusal came
    within SLACK_S after the last one's wait: reads go through all along (RQ's WATCH loop reads between
    refused transactions), so a command that went through does not prove there is space."""

    since: float | None = None  # monotonic time of the episode's first refusal
    last: float = 0.0  # of the latest refusal
    wait: float = 0.0  # the wait that followed it
    refusals: int = 0

    def refused(self, now: float) -> float:
        """Note a refusal at `now`; returns how long to wait before trying again."""
        if self.since is None:
            self.since = now
        self.refusals += 1
        self.last = now
        self.wait = doubling(FULL_FIRST_WAIT_S, FULL_MAX_WAIT_S, self.refusals)
        return self.wait

    def waited(self, now: float | None = None) -> float | None:
        """Seconds since the first refusal while the wait goes on, else None."""
        now = time.monotonic() if now is None else now
        if self.since is None or now > self.last + self.wait + SLACK_S:
            return None
        return now - self.since

    def end(self) -> float:
        """Close the episode (there is one: `since` is set); returns how long it lasted."""
        lasted = self.last + self.wait - self.since
        self.since, self.refusals = None, 0
        return lasted


class RideOut(Retry):
    """The retry policy of the worker's client (see the module's docstring)."""

    def __init__(self, outage_s: float = DEFAULT_OUTAGE_S) -> None:
        super().__init__(NoBackoff(), 0)  # connection errors, TimeoutError, socket.timeout
        # READONLY: the server it reaches was demoted to a replica in a failover (it keeps its clients):
        # an outage like a dropped connection, ridden out by reconnecting (to the new primary).
        self.update_supported_errors([OutOfMemoryError, ReadOnlyError])
        self.outage_s = outage_s
        self.clock = FullClock()

    def __deepcopy__(self, memo: dict) -> RideOut:
        # redis-py gives each new pooled connection a deep copy of the client's retry. This one keeps no
        # state per call: shared, the client knows it is waiting whichever of its connections was refused.
        return self

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        refused = False
        failures, outage_since = 0, None  # connection errors in this call, and when the first came
        while True:
            try:
                result = do()
            except OutOfMemoryError as error:
                refused = True
                self._wait_for_space(error)  # first: inside a WATCH, `fail` raises WatchError, RQ starts over
                fail(error, failures) if with_failure_count else fail(error)
                continue
            except (AuthenticationError, AuthorizationError):
                raise  # the deployment's mistake: waiting would only hide it
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                now = time.monotonic()
                outage_since = outage_since or now
                fail(error, failures) if with_failure_count else fail(error)
                if now - outage_since >= self.outage_s:
                    raise
                wait = doubling(OUTAGE_FIRST_WAIT_S, OUTAGE_MAX_WAIT_S, failures)
                log.warning("redis_unreachable", waited_s=round(now - outage_since, 1), retry_in_s=wait,
                            gives_up_after_s=self.outage_s, error=f"{type(error).__name__}: {error}")
                time.sleep(wait)
                continue
            if outage_since is not None:
                log.info("redis_reachable", waited_s=round(time.monotonic() - outage_since, 1))
            if self.clock.since is not None and (refused or self.clock.waited() is None):
                log.info("redis_space_back", waited_s=round(self.clock.end(), 1))
            return result

    def _wait_for_space(self, error: Exception) -> None:
        now = time.monotonic()
        if self.clock.since is not None and self.clock.waited(now) is None:
            self.clock.end()  # an earlier episode, long over: this is a new one
        wait = self.clock.refused(now)
        log.warning("redis_full", waited_s=round(now - (self.clock.since or now), 1), retry_in_s=wait,
                    error=str(error),
                    fix="free memory in Redis or raise its maxmemory; results expire after DEEPFAKE_RESULT_TTL_S")
        time.sleep(wait)


def ride_out(connection: Redis, outage_s: float | None = None) -> RideOut:
    """Give `connection` (and every pooled connection of it) the worker's retry policy; idempotent.
    `outage_s`, when given, sets how long it rides out an unreachable Redis."""
    retry = connection.get_retry()
    if not isinstance(retry, RideOut):
        retry = RideOut()
        connection.set_retry(retry)
    if outage_s is not None:
        retry.outage_s = outage_s  # shared with the pooled connections' copies
    return retry


def database_address(connection: Redis | str) -> tuple:
    """What decides which database a client (or a URL) reaches, not timeouts or pool sizes: to compare two."""
    if isinstance(connection, str):
        connection = Redis.from_url(connection)
    kw = dict(connection.connection_pool.connection_kwargs)
    if kw.get("host") == "localhost":
        kw["host"] = "127.0.0.1"  # RQ's default names it, the settings' default the address
    kw["db"] = int(kw.get("db") or 0)
    return tuple(kw.get(k) for k in ("host", "port", "path", "db", "username", "password"))


def connection_url(connection: Redis) -> str:
    """The URL of the Redis a client talks to, for a log line: its password masked."""
    kw = connection.connection_pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db') or 0}"
    auth = f"{kw.get('username') or ''}:***@" if kw.get("password") else ""
    return f"redis://{auth}{kw.get('host')}:{kw.get('port')}/{kw.get('db') or 0}"


def without_password(url: str) -> str:
    """A Redis URL fit for a log line or an error message: the password masked wherever redis-py
    reads one (`user:password@`, which may hold `/` or `@`, and a `password=` query parameter)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:  # the last one: a password may hold '@', '/' or '?' (a query's '@' masks more, not less)
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:***" if colon else userinfo
    else:
        userinfo = None
    rest, qmark, query = rest.partition("?")
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}://{'' if userinfo is None else userinfo + '@'}{rest}{qmark}{query}"


def waiting_for_space(connection: Redis) -> float | None:
    """How long `connection` has waited for Redis space (None when it is not waiting, or never waits)."""
    retry = connection.get_retry()
    return retry.clock.waited() if isinstance(retry, RideOut) else None


class WaitingRedis(Redis):
    """The worker's client as `rq worker` makes it: RQ_CONNECTION_CLASS=worker.redis_client.WaitingRedis,
    so that it waits at start-up too (RQ's suspension check runs before the worker exists, hence
    logging is set up here as the worker will set it up)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        exit_on_sigterm()  # as PID 1, `rq worker` would otherwise ignore SIGTERM until then
        try:
            settings = Settings()
        except ValidationError:
            ride_out(self)  # the worker reports the settings' error as it starts
            return
        ride_out(self, settings.redis_outage_s)
        configure_logging(settings.log_format, settings.log_level)
