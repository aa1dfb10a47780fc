"""The circuit breaker's state changes and the retry guard, with an injected clock."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc

from app.db.resilience import (
    BreakerState,
    CircuitBreaker,
    Guard,
    RetryPolicy,
    is_transient,
    is_unavailable,
)
from app.errors import InsufficientCreditsError, StorageUnavailableError


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Ticks, threshold: int = 3, reset: float = 10) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, reset_timeout=reset, clock=clock)


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def pg_error(kind: type[sa_exc.DBAPIError], sqlstate: str) -> sa_exc.DBAPIError:
    return kind("SELECT 1", {}, _PgError(sqlstate))


def sqlite_error(code: int) -> sa_exc.OperationalError:
    orig = sqlite3.OperationalError("busy")
    orig.sqlite_errorcode = code  # type: ignore[attr-defined]
    return sa_exc.OperationalError("INSERT", {}, orig)


class TestClassification:
    @pytest.mark.parametrize(
        "error",
        [
            ConnectionRefusedError(),
            ConnectionResetError(),
            pg_error(sa_exc.OperationalError, "53300"),
            pg_error(sa_exc.OperationalError, "40001"),
            pg_error(sa_exc.OperationalError, "40P01"),
            pg_error(sa_exc.OperationalError, "57P01"),
            pg_error(sa_exc.InterfaceError, "08006"),
            sqlite_error(sqlite3.SQLITE_BUSY),
        ],
        ids=[
            "refused",
            "reset",
            "too-many",
            "serialization",
            "deadlock",
            "shutdown",
            "08006",
            "busy",
        ],
    )
    def test_transient_faults_are_retried(self, error: BaseException) -> None:
        assert is_transient(error) and is_unavailable(error)

    def test_an_invalidated_connection_is_transient(self) -> None:
        error = sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
        assert is_transient(error)

    @pytest.mark.parametrize(
        "error",
        [
            pg_error(sa_exc.IntegrityError, "23505"),
            pg_error(sa_exc.ProgrammingError, "42P01"),
            sqlite_error(sqlite3.SQLITE_CONSTRAINT),
            ValueError("bad"),
        ],
        ids=["unique", "undefined-table", "sqlite-constraint", "value-error"],
    )
    def test_other_errors_are_neither_retried_nor_unavailability(
        self, error: BaseException
    ) -> None:
        assert not is_transient(error) and not is_unavailable(error)

    @pytest.mark.parametrize(
        "error",
        [sa_exc.TimeoutError("pool"), TimeoutError(), pg_error(sa_exc.OperationalError, "57014")],
        ids=["pool-exhausted", "connect-timeout", "statement-timeout"],
    )
    def test_timeouts_are_unavailability_but_not_retried(self, error: BaseException) -> None:
        assert is_unavailable(error) and not is_transient(error)


class TestBreakerStates:
    def test_it_starts_closed_and_lets_calls_through(self) -> None:
        subject = breaker(Ticks())
        assert subject.state is BreakerState.CLOSED and subject.acquire()

    def test_it_opens_after_the_threshold_of_failures_in_a_row(self) -> None:
        subject = breaker(Ticks(), threshold=3)
        for _ in range(2):
            subject.record_failure()
        assert subject.state is BreakerState.CLOSED
        subject.record_failure()
        assert subject.state is BreakerState.OPEN
        assert not subject.acquire()

    def test_a_success_resets_the_count(self) -> None:
        subject = breaker(Ticks(), threshold=3)
        subject.record_failure()
        subject.record_failure()
        subject.record_success()
        subject.record_failure()
        subject.record_failure()
        assert subject.state is BreakerState.CLOSED

    def test_it_turns_half_open_after_the_reset_timeout_and_lets_one_probe_through(self) -> None:
        clock = Ticks()
        subject = breaker(clock, threshold=1, reset=10)
        subject.record_failure()
        clock.now += 9.9
        assert subject.state is BreakerState.OPEN and subject.retry_after() == 1
        clock.now += 0.1
        assert subject.state is BreakerState.HALF_OPEN
        assert subject.acquire()
        assert not subject.acquire()  # one probe at a time

    def test_a_successful_probe_closes_it(self) -> None:
        clock = Ticks()
        subject = breaker(clock, threshold=1, reset=10)
        subject.record_failure()
        clock.now += 10
        assert subject.acquire()
        subject.record_success()
        assert subject.state is BreakerState.CLOSED and subject.acquire()

    def test_a_failed_probe_opens_it_again_for_a_full_period(self) -> None:
        clock = Ticks()
        subject = breaker(clock, threshold=1, reset=10)
        subject.record_failure()
        clock.now += 10
        assert subject.acquire()
        subject.record_failure()
        assert subject.state is BreakerState.OPEN
        assert subject.retry_after() == 10

    def test_a_probe_that_ends_without_a_verdict_frees_the_slot(self) -> None:
        clock = Ticks()
        subject = breaker(clock, threshold=1, reset=10)
        subject.record_failure()
        clock.now += 10
        assert subject.acquire()
        subject.release()
        assert subject.acquire()

    def test_late_failures_while_open_do_not_extend_the_period(self) -> None:
        clock = Ticks()
        subject = breaker(clock, threshold=1, reset=10)
        subject.record_failure()
        clock.now += 5
        subject.record_failure()  # a call that started before the circuit opened
        assert subject.retry_after() == 5


def guard(subject: CircuitBreaker, attempts: int = 3) -> Guard:
    return Guard(
        subject, RetryPolicy(attempts=attempts, max_seconds=5, initial_backoff=0, max_backoff=0)
    )


class Flaky:
    """Fails with the given errors, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class TestGuard:
    async def test_transient_faults_are_retried_until_success(self) -> None:
        unit = Flaky(ConnectionResetError(), pg_error(sa_exc.OperationalError, "40P01"))
        assert await guard(breaker(Ticks())).run(unit) == "ok"
        assert unit.calls == 3

    async def test_retries_are_bounded_and_end_as_storage_unavailable(self) -> None:
        unit = Flaky(*[ConnectionRefusedError()] * 10)
        subject = breaker(Ticks(), threshold=5)
        with pytest.raises(StorageUnavailableError):
            await guard(subject, attempts=3).run(unit)
        assert unit.calls == 3

    @pytest.mark.parametrize(
        "error",
        [pg_error(sa_exc.IntegrityError, "23505"), sa_exc.TimeoutError("pool exhausted")],
        ids=["integrity", "pool-exhausted"],
    )
    async def test_integrity_errors_and_pool_exhaustion_are_not_retried(
        self, error: BaseException
    ) -> None:
        unit = Flaky(error)
        with pytest.raises((type(error), StorageUnavailableError)):
            await guard(breaker(Ticks())).run(unit)
        assert unit.calls == 1

    async def test_an_exhausted_pool_is_503_without_counting_against_the_database(self) -> None:
        subject = breaker(Ticks(), threshold=1)
        with pytest.raises(StorageUnavailableError):
            await guard(subject).run(Flaky(sa_exc.TimeoutError("pool")))
        assert subject.state is BreakerState.CLOSED

    async def test_domain_errors_pass_through_and_count_as_the_database_answering(self) -> None:
        subject = breaker(Ticks(), threshold=2)
        subject.record_failure()
        with pytest.raises(InsufficientCreditsError):
            await guard(subject).run(Flaky(InsufficientCreditsError("u", 0, 1)))
        subject.record_failure()
        assert subject.state is BreakerState.CLOSED

    async def test_an_open_circuit_fails_at_once_without_calling(self) -> None:
        subject = breaker(Ticks(), threshold=1, reset=30)
        subject.record_failure()
        unit = Flaky()
        with pytest.raises(StorageUnavailableError) as raised:
            await guard(subject).run(unit)
        assert unit.calls == 0
        assert raised.value.retry_after == 30

    async def test_failed_calls_open_the_circuit(self) -> None:
        subject = breaker(Ticks(), threshold=2)
        for _ in range(2):
            with pytest.raises(StorageUnavailableError):
                await guard(subject, attempts=1).run(Flaky(ConnectionRefusedError()))
        assert subject.state is BreakerState.OPEN
