"""Waiting out a full Redis instead of dying.

With `maxmemory` and the `noeviction` policy (what `deepfake check` asks for), a full Redis refuses
writes, and any command inside a transaction, with an OOM error. RQ lets that error escape: a worker
finishing a job exits with the job still marked started (it waits for RQ's maintenance to call it
abandoned), and `rq worker` exits at start-up before loading anything, so Kubernetes restarts it in a
loop. The worker's connection instead retries a refused command, backing off to every 30 s, for as
long as Redis stays full. A refused command changed nothing (Redis discards a whole transaction that
held one, and refuses a script only before its first write), so running it again is safe; inside a
WATCH, redis-py raises WatchError instead and RQ starts that step over, as it does on a lost connection.

`redis_full` is logged at each wait and `redis_space_back` once the refused command goes through; the worker's
/healthz stays up meanwhile (a restart cannot free Redis) and `deepfake_redis_full_seconds` says how
long it has waited. Connection errors keep redis-py's own bounded retries.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError
from redis.retry import Retry

from worker.logging import configure_logging
from worker.settings import Settings

log = structlog.get_logger("worker.redis_full")

T = TypeVar("T")
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0
SLACK_S = 10.0


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
        self.wait = min(FIRST_WAIT_S * 2 ** min(self.refusals - 1, 16), MAX_WAIT_S)
        return self.wait

    def waited(self, now: float | None = None) -> float | None:
        """Seconds since the first refusal while the wait goes on, else None."""
        now = time.monotonic() if now is None else now
        if self.since is None or now > self.last + self.wait + SLACK_S:
            return None
        return now - self.since

    def end(self) -> float | None:
        """Close the episode; returns how long it lasted (None when there was none)."""
        lasted = None if self.since is None else self.last + self.wait - self.since
        self.since, self.refusals = None, 0
        return lasted


class WaitWhenFull(Retry):
    """redis-py's retry policy for one client, plus: a command Redis refused for lack of memory is
    run again, without limit, after a wait that doubles from FIRST_WAIT_S to MAX_WAIT_S."""

    def __init__(self, base: Retry) -> None:
        super().__init__(base._backoff, base._retries, tuple({*base._supported_errors, OutOfMemoryError}))
        self.clock = FullClock()

    def __deepcopy__(self, memo: dict) -> WaitWhenFull:
        # redis-py gives each new pooled connection a deep copy of the client's retry: the copies share
        # the clock, so the client knows it is waiting whichever of its connections was refused.
        twin = copy.copy(self)
        twin._backoff = copy.deepcopy(self._backoff, memo)
        return twin

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        self._backoff.reset()
        failures = 0  # connection errors: bounded by the base policy's retries
        refused = False
        while True:
            try:
                result = do()
            except OutOfMemoryError as error:
                refused = True
                # Wait first: inside a WATCH, `fail` raises WatchError and RQ starts over at once.
                self._wait(error)
                fail(error, failures) if with_failure_count else fail(error)
                continue
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                if 0 <= self._retries < failures:
                    raise
                backoff = self._backoff.compute(failures)
                if backoff > 0:
                    time.sleep(backoff)
                continue
            if self.clock.since is not None and (refused or self.clock.waited() is None):
                lasted = self.clock.end()
                if lasted is not None:
                    log.info("redis_space_back", waited_s=round(lasted, 1))
            return result

    def _wait(self, error: Exception) -> None:
        now = time.monotonic()
        if self.clock.since is not None and self.clock.waited(now) is None:
            self.clock.end()  # an earlier episode, long over: this is a new one
        wait = self.clock.refused(now)
        log.warning("redis_full", waited_s=round(now - (self.clock.since or now), 1), retry_in_s=wait,
                    error=str(error),
                    fix="free memory in Redis or raise its maxmemory; results expire after DEEPFAKE_RESULT_TTL_S")
        time.sleep(wait)


def wait_when_full(connection: Redis) -> WaitWhenFull:
    """Make `connection` (and every pooled connection of it) wait out a full Redis; idempotent."""
    retry = connection.get_retry()
    if not isinstance(retry, WaitWhenFull):
        # A client made by from_url has no retry of its own, and its connections do not retry a lost
        # connection (RQ's loop does that): kept so.
        base = retry if retry is not None else Retry(NoBackoff(), 0)
        retry = WaitWhenFull(base)
        connection.set_retry(retry)
    return retry


def waiting_for(connection: Redis) -> float | None:
    """How long `connection` has waited for Redis space (None when it is not waiting, or never waits)."""
    retry = connection.get_retry()
    return retry.clock.waited() if isinstance(retry, WaitWhenFull) else None


class WaitingRedis(Redis):
    """A Redis client that waits out a full Redis: RQ_CONNECTION_CLASS=worker.redis_full.WaitingRedis,
    so that `rq worker` waits at start-up too (its suspension check runs before the worker exists,
    hence logging is set up here as the worker will set it up)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        wait_when_full(self)
        try:
            settings = Settings()
        except ValidationError:
            return  # the worker reports it as it starts
        configure_logging(settings.log_format, settings.log_level)
