"""Retries and the circuit breaker in front of the database.

Failures are classified by exception type and SQLSTATE, never by message text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar

import asyncpg
from sqlalchemy import exc as sa_exc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from app.errors import StorageUnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

# too_many_connections, serialization_failure, deadlock_detected, admin_shutdown,
# crash_shutdown, cannot_connect_now; class 08 (connection exception) is added below.
RETRYABLE_SQLSTATES = frozenset({"53300", "40001", "40P01", "57P01", "57P02", "57P03"})
# The database answered but cannot serve now: 503, not worth retrying at once. Statement
# timeout, insufficient resources, lock timeout, database not accepting connections or
# missing, credentials refused.
UNAVAILABLE_SQLSTATES = frozenset(
    {"57014", "53000", "53100", "53200", "55P03", "55000", "3D000", "28000", "28P01"}
)
_SQLITE_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# asyncpg's InternalClientError is a connection in a state it cannot use: one the server
# told of its termination while it sat idle, before the socket closed; its
# ConnectionDoesNotExistError, one that closed under a statement. The fast path closes
# such a connection (app/repositories/postgres/connections.py); a new attempt gets another.
_CONNECTION_ERRORS = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    asyncpg.InternalClientError,
    asyncpg.ConnectionDoesNotExistError,
)


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error, raised by asyncpg itself (the PostgreSQL fast
    path) or wrapped by SQLAlchemy."""
    state = getattr(error, "sqlstate", None) or getattr(
        getattr(error, "orig", None), "sqlstate", None
    )
    return state if isinstance(state, str) else None


def is_transient(error: BaseException) -> bool:
    """A fault that a new attempt of the whole unit of work may not meet again."""
    if isinstance(error, _CONNECTION_ERRORS):
        return True
    if isinstance(error, asyncpg.PostgresError):  # raised by the fast path, unwrapped
        return _retryable(sqlstate(error))
    if not isinstance(error, sa_exc.DBAPIError) or isinstance(error, sa_exc.IntegrityError):
        return False
    if error.connection_invalidated:
        return True
    state = sqlstate(error)
    if state is not None:
        return _retryable(state)
    code = getattr(error.orig, "sqlite_errorcode", None)
    return code in _SQLITE_BUSY_CODES


def _retryable(state: str | None) -> bool:
    return state is not None and (state in RETRYABLE_SQLSTATES or state.startswith("08"))


def is_unavailable(error: BaseException) -> bool:
    """The store cannot serve now (503): transient faults, an exhausted pool, timeouts."""
    if is_transient(error) or isinstance(error, sa_exc.TimeoutError | TimeoutError | OSError):
        return True
    return sqlstate(error) in UNAVAILABLE_SQLSTATES


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed → open after `failure_threshold` transient failures in a row; open for
    `reset_timeout` seconds, failing calls at once; then half-open, letting one probe
    through: its success closes the circuit, its failure opens it again.

    A small class of our own: the asyncio breakers on PyPI are thinly maintained,
    and none gives the injected clock and the one-probe half-open state this needs.
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._reset_timeout:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def retry_after(self) -> int:
        """Whole seconds until a probe may go through (at least 1)."""
        if self._opened_at is None:
            return 1
        remaining = self._reset_timeout - (self._clock() - self._opened_at)
        return max(1, math.ceil(remaining))

    def acquire(self) -> bool:
        """May a call go through now? In half-open, only one probe at a time."""
        if self._opened_at is None:  # closed: the hot path
            return True
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        if self._opened_at is not None:
            logger.warning("circuit breaker closed: the database answers again")
        self._failures, self._opened_at, self._probing = 0, None, False

    def record_failure(self) -> None:
        """A transient failure: counts toward opening; a failed probe reopens at once."""
        probing, self._probing = self._probing, False
        self._failures += 1
        if probing or (self._opened_at is None and self._failures >= self._threshold):
            self._opened_at = self._clock()
            logger.warning("circuit breaker open for %.1f s", self._reset_timeout)

    def release(self) -> None:
        """The call ended without telling anything about the database's health."""
        self._probing = False


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    max_seconds: float
    initial_backoff: float
    max_backoff: float


class Guard:
    """Runs one whole unit of work with retries for transient faults, behind the breaker.

    Integrity errors, an exhausted pool and an open circuit are never retried.
    Whatever leaves the store unable to serve becomes StorageUnavailableError (503).
    The classifiers default to the database's; another store (Redis) brings its own.
    """

    def __init__(
        self,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        *,
        transient: Callable[[BaseException], bool] = is_transient,
        unavailable: Callable[[BaseException], bool] = is_unavailable,
    ) -> None:
        self.breaker = breaker
        self._policy = policy
        self._transient = transient
        self._unavailable = unavailable

    async def run(
        self, operation: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`await operation(*args, **kwargs)`, retried and behind the breaker."""
        if not self.breaker.acquire():
            raise StorageUnavailableError(
                "storage is unavailable (circuit open)", retry_after=self.breaker.retry_after()
            )
        try:
            # The first attempt runs bare, in this very frame: a retry controller, or
            # another coroutine, for every call costs a good part of the hot path.
            try:
                result: T = await operation(*args, **kwargs)
            except Exception as error:
                if self._policy.attempts < 2 or not self._transient(error):
                    raise
                logger.info("transient database fault (%s); retrying", type(error).__name__)
                result = await self._retry(operation, args, kwargs)
        except Exception as error:
            if self._transient(error):
                self.breaker.record_failure()
            elif self._unavailable(error):
                self.breaker.release()
            else:  # the database answered, if only to refuse: it is up
                self.breaker.record_success()
                raise
            raise StorageUnavailableError(retry_after=self.breaker.retry_after()) from error
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record_success()
        return result

    async def _retry(
        self,
        operation: Callable[P, Awaitable[T]],
        args: Any,
        kwargs: Any,
    ) -> T:
        """The attempts after a first one failed with a transient fault."""
        policy = self._policy
        await asyncio.sleep(policy.initial_backoff * (1 + random.random()))
        controller = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts - 1) | stop_after_delay(policy.max_seconds),
            wait=wait_exponential_jitter(
                multiplier=policy.initial_backoff * 2,
                max=policy.max_backoff,
                jitter=policy.initial_backoff,  # tenacity's default jitter is a whole second
            ),
            retry=retry_if_exception(self._transient),
            before_sleep=_log_retry,
            reraise=True,
        )
        result: T = await controller(operation, *args, **kwargs)
        return result


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    logger.info(
        "transient database fault (%s, sqlstate %s); attempt %d failed, retrying",
        type(error).__name__,
        sqlstate(error) if error else None,
        state.attempt_number,
    )
