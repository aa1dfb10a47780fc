"""PostgreSQL's fast path runs on connections of its own (app/repositories/
postgres/connections.py): within the pool budget, handed to waiting calls in turn (and a call
declined to the general path when its turn does not come in time), given up on when the
database falls silent, and prepared anew after a schema change."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from app.config import Settings
from app.container import Container, build_container
from app.errors import StorageUnavailableError
from app.repositories.postgres.connections import FastConnections
from tests.conftest import fresh_database, plain_dsn
from tests.support.relay import relayed

pytestmark = pytest.mark.postgres


@pytest.fixture
async def service(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Container]]:
    """Builds the service on a fresh PostgreSQL database with the given settings."""
    containers: list[Container] = []
    async with fresh_database(request, "postgres") as url:

        def build(**overrides: object) -> Container:
            settings = Settings.model_validate(
                {"database_url": url, "run_migrations_on_startup": False, **overrides}
            )
            containers.append(build_container(settings))
            return containers[-1]

        try:
            yield build
        finally:
            for container in containers:
                await container.close()


async def _connections_of(url: str) -> int:
    admin = await asyncpg.connect(plain_dsn(url))
    try:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shopping-assistant'"
        return int(await admin.fetchval(sql))
    finally:
        await admin.close()


class TestBudget:
    async def test_both_pools_together_stay_within_pool_size_and_overflow(
        self, service: Callable[..., Container]
    ) -> None:
        container = service(db_pool_size=2, db_max_overflow=3, db_fast_path_connections=2)
        credits, consents = container.credit_service(), container.consent_service()
        await asyncio.gather(*(credits.get_user_credits(f"u{n}") for n in range(5)))
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, await _connections_of(container.settings.database_url))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            for _ in range(5):
                await asyncio.gather(
                    *(credits.deduct_credits(f"u{n}", 1) for n in range(5)),
                    *(consents.record_consent(f"u{n}") for n in range(5)),
                    credits.reset_credits("resetter"),
                )
        finally:
            watcher.cancel()
        assert container.fast is not None and container.fast.size == 2
        assert 3 <= peak <= 5  # the fast path's and the engine's connections were both used
        for n in range(5):
            assert (await credits.get_user_credits(f"u{n}")).available_credits == 5

    async def test_calls_outnumbering_the_fast_connections_are_all_served(
        self, service: Callable[..., Container]
    ) -> None:
        container = service(db_fast_path_connections=1)
        credits = container.credit_service()
        accounts = await asyncio.gather(
            *(credits.deduct_credits(f"many-{n}", 3) for n in range(12))
        )
        assert {account.available_credits for account in accounts} == {7}
        assert container.fast is not None and container.fast.figures["open"] == 1

    async def test_no_overflow_leaves_no_fast_path_and_the_service_works(
        self, service: Callable[..., Container]
    ) -> None:
        container = service(db_pool_size=1, db_max_overflow=0)
        assert container.fast is None
        credits = container.credit_service()
        await credits.deduct_credits("alone", 4)
        assert (await credits.refund_credits("alone", 1)).available_credits == 7

    async def test_closing_closes_every_connection_of_the_fast_path(
        self, service: Callable[..., Container]
    ) -> None:
        container = service(db_pool_size=1, db_max_overflow=4, db_fast_path_connections=4)
        credits = container.credit_service()
        await asyncio.gather(*(credits.deduct_credits(f"c{n}", 1) for n in range(8)))
        assert container.fast is not None and container.fast.figures["open"] >= 2
        await container.fast.close()
        await container.engine.dispose()
        assert container.fast.figures["open"] == 0
        assert await _connections_of(container.settings.database_url) == 0

    async def test_a_connection_older_than_the_recycle_age_is_replaced(
        self, service: Callable[..., Container]
    ) -> None:
        container = service(db_pool_recycle=1, db_fast_path_connections=1)
        credits = container.credit_service()
        await credits.deduct_credits("aged", 1)
        assert container.fast is not None and container.fast.figures["open"] == 1
        await asyncio.sleep(1.1)
        await credits.deduct_credits("aged", 1)  # runs, then its connection is closed
        assert container.fast.figures["open"] == 0
        assert (await credits.deduct_credits("aged", 1)).available_credits == 7


def break_connection_once(monkeypatch: pytest.MonkeyPatch, *, after_commit: bool) -> list[str]:
    """The fast path's next statement meets a reset connection, before it reaches the
    server or after it committed; returns the statements that broke (one, once run)."""
    original = FastConnections.fetch
    broken: list[str] = []

    async def fetch(self: FastConnections, sql: str, *args: object) -> object:
        if broken:
            return await original(self, sql, *args)
        broken.append(sql)
        if after_commit:
            await original(self, sql, *args)
        raise ConnectionResetError("the connection broke")

    monkeypatch.setattr(FastConnections, "fetch", fetch)
    return broken


class TestTurns:
    """Calls that find every fast connection busy wait their turn, up to wait_seconds."""

    @staticmethod
    def _one_connection(url: str, wait_seconds: float) -> FastConnections:
        connect = functools.partial(asyncpg.connect, plain_dsn(url))
        return FastConnections(
            connect, size=1, recycle_seconds=3600, answer_timeout=None, wait_seconds=wait_seconds
        )

    async def test_waiting_calls_are_served_on_the_fast_path_first_come_first_served(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with fresh_database(request, "postgres") as url:
            fast = self._one_connection(url, wait_seconds=5)
            served: list[int] = []

            async def call(n: int) -> list[asyncpg.Record] | None:
                rows = await fast.fetch("SELECT $1::int FROM pg_sleep(0.01)", n)
                served.append(n)
                return rows

            try:
                results = await asyncio.gather(*(call(n) for n in range(12)))
                assert results == [[(n,)] for n in range(12)]  # none declined
                assert served == list(range(12))
                assert fast.figures == {"size": 1, "open": 1, "busy": 0}
            finally:
                await fast.close()

    async def test_a_call_whose_turn_does_not_come_within_the_wait_is_declined(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with fresh_database(request, "postgres") as url:
            fast = self._one_connection(url, wait_seconds=0.2)
            try:
                long = asyncio.create_task(fast.fetch("SELECT 1 FROM pg_sleep(1)"))
                await asyncio.sleep(0.1)  # the long statement holds the one connection
                started = time.monotonic()
                assert await fast.fetch("SELECT 2") is None  # the caller's general path
                assert 0.15 <= time.monotonic() - started < 0.8
                assert await long == [(1,)]
                assert await fast.fetch("SELECT 3") == [(3,)]  # the connection still serves
            finally:
                await fast.close()


class TestLostAnswers:
    """A deduction whose connection broke, before its statement reached the server or
    after it committed (the answer lost), is retried by the guard with the same attempt.
    A key the service made for the call sits on the ledger row of a committed first
    attempt: the retry must find it there and charge nothing twice, and charge once
    when it is not there."""

    @pytest.mark.parametrize(
        "after_commit", [True, False], ids=["first attempt committed", "first attempt not sent"]
    )
    @pytest.mark.parametrize("first_sight", [False, True], ids=["steady", "first sight"])
    async def test_a_retried_deduction_charges_once(
        self,
        service: Callable[..., Container],
        monkeypatch: pytest.MonkeyPatch,
        after_commit: bool,
        first_sight: bool,
    ) -> None:
        credits = service().credit_service()
        if not first_sight:
            await credits.deduct_credits("lost", 1)
        broken = break_connection_once(monkeypatch, after_commit=after_commit)
        account = await credits.deduct_credits("lost", 2)
        assert broken, "the fast path did not run"
        history = await credits.get_transaction_history("lost")
        assert [row.amount for row in history] == ([-2] if first_sight else [-2, -1])
        assert account.available_credits == sum(row.amount for row in history) + 10


class TestSchemaChanges:
    async def test_a_statement_prepared_before_a_migration_is_prepared_anew(
        self, service: Callable[..., Container]
    ) -> None:
        container = service(db_fast_path_connections=1)
        await container.credit_service().deduct_credits("migrated", 1)
        fast = container.fast
        assert fast is not None
        read = "SELECT available_credits FROM user_credits WHERE user_id = $1"
        assert (await fast.fetch(read, "migrated")) == [(9,)]  # prepared on the one connection
        # What a migration might do under a running service: the result's type changes.
        admin = await asyncpg.connect(plain_dsn(container.settings.database_url))
        try:
            await admin.execute("ALTER TABLE user_credits ALTER available_credits TYPE bigint")
        finally:
            await admin.close()
        assert (await fast.fetch(read, "migrated")) == [(9,)]
        assert fast.figures["open"] == 1  # the same connection, its statement prepared anew


class TestSilentDatabase:
    """A database that stops answering without closing anything (a host gone silent):
    the fast path gives up on the statement instead of waiting for ever."""

    async def test_a_statement_left_unanswered_raises_timeout_and_the_next_gets_through(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with fresh_database(request, "postgres") as url, relayed(url) as (via, relay):
            connect = functools.partial(asyncpg.connect, plain_dsn(via))
            fast = FastConnections(
                connect, size=1, recycle_seconds=3600, answer_timeout=0.3, wait_seconds=1
            )
            try:
                assert await fast.fetch("SELECT 1") == [(1,)]
                relay.hold()
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(fast.fetch("SELECT 2"), 5)
                assert 0.3 <= time.monotonic() - started < 1.5
                relay.release()
                # The connection given up on was closed, not handed to the next call.
                assert fast.figures["open"] == 0
                assert await fast.fetch("SELECT 3") == [(3,)]
            finally:
                await fast.close()

    async def test_a_deduction_the_database_never_answers_fails_as_unavailable(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with fresh_database(request, "postgres") as url, relayed(url) as (via, relay):
            # The client gives up 5 s after the statement timeout.
            settings = Settings(
                database_url=via, db_statement_timeout_ms=100, run_migrations_on_startup=False
            )
            container = build_container(settings)
            try:
                credits = container.credit_service()
                await credits.deduct_credits("silent", 1)
                relay.hold()
                started = time.monotonic()
                with pytest.raises(StorageUnavailableError):
                    await asyncio.wait_for(credits.deduct_credits("silent", 1), 15)
                assert 5.1 <= time.monotonic() - started < 7
                relay.release()
                # Never sent, so never charged.
                assert (await credits.deduct_credits("silent", 1)).available_credits == 8
            finally:
                await container.close()
