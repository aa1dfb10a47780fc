"""The PostgreSQL fast paths keep pooled connections between calls (app/repositories/
pg_driver.py); the general path must never starve for them, and they must go back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.config import Settings
from app.container import Container, build_container
from app.db import create_engine
from app.errors import StorageUnavailableError
from app.repositories.pg_driver import DriverStatements
from tests.conftest import fresh_database
from tests.support.relay import relayed

pytestmark = pytest.mark.postgres


@pytest.fixture
async def small_pool(request: pytest.FixtureRequest) -> AsyncIterator[Container]:
    """The service on PostgreSQL with a pool of two and no overflow, waiting 2 s at most."""
    async with fresh_database(request, "postgres") as url:
        settings = Settings(
            database_url=url,
            db_pool_size=2,
            db_max_overflow=0,
            db_pool_timeout=2,
            run_migrations_on_startup=False,
        )
        container = build_container(settings)
        try:
            yield container
        finally:
            await container.close()


class TestHeldConnections:
    async def test_a_connection_is_held_after_a_fast_path_call_and_handed_back_when_unused(
        self, small_pool: Container
    ) -> None:
        await small_pool.credit_service().deduct_credits("held", 1)
        assert small_pool.driver.idle == 1
        await asyncio.sleep(0.2)
        assert small_pool.driver.idle == 0
        assert small_pool.engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    async def test_the_general_path_gets_connections_while_the_fast_path_holds_one(
        self, small_pool: Container
    ) -> None:
        credits, consents = small_pool.credit_service(), small_pool.consent_service()
        await credits.deduct_credits("busy", 1)
        # Four transactions at once on a pool of two, one of which the fast path holds:
        # they share what is left, one after another, well within the pool timeout.
        async with asyncio.timeout(1.5):
            await asyncio.gather(
                *(consents.record_consent(f"consenting-{n}") for n in range(3)),
                credits.upgrade_to_registered("new-upgrade"),  # first sight: the general path
            )
        assert (await credits.deduct_credits("busy", 1)).available_credits == 8

    async def test_no_connection_is_held_when_the_pool_has_no_room_left(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with fresh_database(request, "postgres") as url:
            settings = Settings(database_url=url, db_pool_size=1, db_max_overflow=0)
            container = build_container(settings)
            try:
                await container.credit_service().deduct_credits("alone", 1)
                assert container.driver.idle == 0
                assert await container.consent_service().get_consent("alone") is None
            finally:
                await container.close()

    async def test_closing_hands_every_held_connection_back(self, small_pool: Container) -> None:
        credits = small_pool.credit_service()
        await asyncio.gather(credits.deduct_credits("a", 1), credits.deduct_credits("b", 1))
        assert small_pool.driver.idle >= 1
        await small_pool.driver.close()
        assert small_pool.driver.idle == 0
        assert small_pool.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def break_connection_once(monkeypatch: pytest.MonkeyPatch, *, after_commit: bool) -> list[str]:
    """The fast path's next statement meets a reset connection, before it reaches the
    server or after it committed; returns the statements that broke (one, once run)."""
    original = DriverStatements.fetch
    broken: list[str] = []

    async def fetch(self: DriverStatements, sql: str, *args: object) -> object:
        if broken:
            return await original(self, sql, *args)
        broken.append(sql)
        if after_commit:
            await original(self, sql, *args)
        raise ConnectionResetError("the connection broke")

    monkeypatch.setattr(DriverStatements, "fetch", fetch)
    return broken


class TestLostAnswers:
    """A deduction whose connection broke, before its statement reached the server or
    after it committed (the answer lost), is retried by the guard. On PostgreSQL the key
    of a committed first attempt sits unclaimed on the ledger row: the retry must find
    it there and charge nothing twice, and charge once when it is not there."""

    @pytest.mark.parametrize(
        "after_commit", [True, False], ids=["first attempt committed", "first attempt not sent"]
    )
    async def test_a_retried_deduction_charges_once(
        self, small_pool: Container, monkeypatch: pytest.MonkeyPatch, after_commit: bool
    ) -> None:
        credits = small_pool.credit_service()
        await credits.deduct_credits("lost", 1)
        broken = break_connection_once(monkeypatch, after_commit=after_commit)
        account = await credits.deduct_credits("lost", 2)
        assert broken, "the fast path did not run"
        assert account.available_credits == 7
        history = await credits.get_transaction_history("lost")
        assert [row.amount for row in history] == [-2, -1]


class TestSchemaChanges:
    async def test_a_statement_prepared_before_a_migration_is_prepared_anew(
        self, small_pool: Container
    ) -> None:
        await small_pool.credit_service().deduct_credits("migrated", 1)
        await small_pool.driver.close()  # its held connection back to the pool of two
        driver = DriverStatements(
            small_pool.engine,
            pool_limit=2,
            recycle_seconds=3600,
            answer_timeout=None,
            idle_seconds=60,
        )
        read = "SELECT available_credits FROM user_credits WHERE user_id = $1"
        try:
            assert (await driver.fetchrow(read, "migrated"))[0] == 9  # prepared, held
            # What a migration might do under a running service: the result's type changes.
            admin = await asyncpg.connect(small_pool.settings.database_url.replace("+asyncpg", ""))
            try:
                await admin.execute("ALTER TABLE user_credits ALTER available_credits TYPE bigint")
            finally:
                await admin.close()
            assert driver.idle == 1  # the same connection, its statement stale
            assert (await driver.fetchrow(read, "migrated"))[0] == 9
        finally:
            await driver.close()


class TestSilentDatabase:
    """A database that stops answering without closing anything (a host gone silent):
    the fast path gives up on the statement instead of waiting for ever."""

    async def test_a_statement_left_unanswered_raises_timeout_and_the_next_gets_through(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with fresh_database(request, "postgres") as url, relayed(url) as (via, relay):
            engine = create_engine(Settings(database_url=via))
            driver = DriverStatements(
                engine, pool_limit=4, recycle_seconds=3600, answer_timeout=0.3
            )
            try:
                assert (await driver.fetchrow("SELECT 1"))[0] == 1
                relay.hold()
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(driver.fetchrow("SELECT 2"), 5)
                assert 0.3 <= time.monotonic() - started < 1.5
                relay.release()
                # The connection given up on was dropped, not handed to the next call.
                assert driver.idle == 0
                assert (await driver.fetchrow("SELECT 3"))[0] == 3
            finally:
                await driver.close()
                await engine.dispose()

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
