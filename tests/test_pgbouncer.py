"""Behind PgBouncer in transaction pooling mode, with its default settings (SPEC §11).

With DB_PREPARED_STATEMENTS=false every route works there (the credit and consent
contracts and the API run there too: PGBOUNCER_TIER in their modules); these tests pin
what is particular to it: many concurrent requests on few server connections, the
statement timeout still enforced though it cannot be a startup parameter, and a start-up
with prepared statements on that says PgBouncer refused it, not that nothing answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import Settings
from app.container import build_container
from app.db.engine import create_engine, transaction_setting
from app.domain.carry import carried_state
from app.errors import StorageUnavailableError
from app.main import create_app
from app.repositories.postgres.statements import DEDUCT_OWN_KEY
from app.services.credits import CreditService
from tests.conftest import app_settings, database_state, fresh_database, plain_dsn
from tests.support.app_client import client_for
from tests.support.pgbouncer import PgBouncer
from tests.support.postgres import PostgresServer
from tests.support.relay import relayed, steady_round_trips

pytestmark = [pytest.mark.postgres, pytest.mark.pgbouncer]
PGBOUNCER_TIER = True
CREDITS = "/api/v1/credits"
ADMIN = "test-admin-token"  # tests/conftest.py's app_settings


@pytest.fixture
async def bounced_url(request: pytest.FixtureRequest, pgbouncer: PgBouncer) -> AsyncIterator[str]:
    """A fresh database at the schema head, reached through PgBouncer."""
    async with fresh_database(request, "pgbouncer") as url:
        yield url


@asynccontextmanager
async def serving(url: str, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The application through PgBouncer; a fault is answered (500), not raised."""
    app = create_app(app_settings("pgbouncer", url, **overrides))
    async with (
        app.router.lifespan_context(app),
        client_for(app, raise_app_exceptions=False) as client,
    ):
        yield client


class TestConcurrentDeductions:
    async def test_120_concurrent_deductions_are_all_charged_and_on_the_ledger(
        self, bounced_url: str
    ) -> None:
        users = ["bounced-0", "bounced-1", "bounced-2"]
        async with serving(bounced_url) as client:
            for user in users:
                await client.get(f"{CREDITS}/{user}", params={"is_guest": "false"})
            responses = await asyncio.gather(
                *(client.post(f"{CREDITS}/{users[i % 3]}/deduct", json={}) for i in range(120))
            )
            assert Counter(response.status_code for response in responses) == {200: 120}
            for user in users:
                account = (await client.get(f"{CREDITS}/{user}")).json()
                ledger = (await client.get(f"{CREDITS}/{user}/transactions")).json()
                assert account["available_credits"] == 50 - 40
                assert sum(row["amount"] for row in ledger) == -40

    async def test_a_short_balance_under_concurrency_is_402_never_500(
        self, bounced_url: str
    ) -> None:
        async with serving(bounced_url) as client:
            await client.get(f"{CREDITS}/hot")
            responses = await asyncio.gather(
                *(client.post(f"{CREDITS}/hot/deduct", json={}) for _ in range(100))
            )
            assert Counter(response.status_code for response in responses) == {200: 10, 402: 90}
            ledger = (await client.get(f"{CREDITS}/hot/transactions")).json()
            assert [row["amount"] for row in ledger] == [-1] * 10


@asynccontextmanager
async def locked_account(server: PostgresServer, url: str, user_id: str) -> AsyncIterator[None]:
    """The account's row locked by a transaction of another client, straight to the
    server, until the block ends."""
    database = url.rsplit("/", 1)[1]
    holder = await asyncpg.connect(plain_dsn(server.url_for(database)))
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM user_credits WHERE user_id = $1 FOR UPDATE", user_id
            )
            yield
    finally:
        await holder.close()


class TestTheStatementTimeout:
    @pytest.mark.parametrize("fast_path", [10, 0], ids=["fast-path", "general-path"])
    async def test_a_statement_past_the_timeout_is_ended_by_the_server_and_answered_503(
        self, bounced_url: str, postgres_server: PostgresServer, fast_path: int
    ) -> None:
        settings = {"db_statement_timeout_ms": 300, "db_fast_path_connections": fast_path}
        async with serving(bounced_url, **settings) as client:
            await client.post(f"{CREDITS}/waiting/deduct", json={})
            async with locked_account(postgres_server, bounced_url, "waiting"):
                # The client's own bound is the timeout + 5 s: a 503 within 3 s is the server's.
                async with asyncio.timeout(3):
                    response = await client.post(f"{CREDITS}/waiting/deduct", json={})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "storage_unavailable"
            after = await client.post(f"{CREDITS}/waiting/deduct", json={})
            assert after.json()["available_credits"] == 8

    async def test_the_timeout_never_reaches_another_client_of_the_server_connection(
        self, bounced_url: str
    ) -> None:
        async with serving(bounced_url, db_statement_timeout_ms=300) as client:
            responses = await asyncio.gather(
                *(client.get(f"{CREDITS}/user-{i}") for i in range(40))
            )
            assert {response.status_code for response in responses} == {200}
        assert await _on_each_server_connection(bounced_url, "SHOW statement_timeout") == ["0"] * 5

    async def test_a_hand_over_s_own_transactions_are_timed_too(
        self, bounced_url: str, postgres_server: PostgresServer
    ) -> None:
        """The state repository runs its own asyncpg transactions
        (app/repositories/postgres/state.py)."""
        settings = app_settings("pgbouncer", bounced_url, db_statement_timeout_ms=300)
        async with serving(bounced_url, db_statement_timeout_ms=300) as client:
            await client.get(f"{CREDITS}/moving")
        engine = create_engine(settings)
        state = database_state(engine, transaction_setting=transaction_setting(settings))
        try:
            [moving] = await state.read(["moving"])
            async with locked_account(postgres_server, bounced_url, "moving"):
                async with asyncio.timeout(3):  # not the client's bound (the timeout + 5 s)
                    with pytest.raises(asyncpg.QueryCanceledError):
                        await state.merge([carried_state(moving)])
        finally:
            await engine.dispose()


class TestPreparedStatements:
    async def test_none_is_left_behind_on_the_server_connections(self, bounced_url: str) -> None:
        async with serving(bounced_url, db_fast_path_connections=0) as client:
            for _ in range(3):
                responses = await asyncio.gather(
                    *(client.post(f"{CREDITS}/user-{i}/deduct", json={}) for i in range(30))
                )
                assert {response.status_code for response in responses} == {200}
        count = "SELECT count(*) FROM pg_prepared_statements"
        assert await _on_each_server_connection(bounced_url, count) == [0] * 5


class TestRoundTrips:
    @pytest.mark.parametrize(
        ("timeout_ms", "expected"),
        [(0, 1), (10_000, 3)],
        ids=["timeout-on-the-role", "timeout-per-transaction"],
    )
    async def test_a_steady_deduction_is_one_round_trip_with_the_timeout_on_the_role(
        self, bounced_url: str, timeout_ms: int, expected: int
    ) -> None:
        # The statement parsed, bound and run in one message; with the timeout set per
        # transaction, BEGIN (with the setting) before it and COMMIT after.
        async with relayed(bounced_url) as (url, relay):
            settings = app_settings("pgbouncer", url, db_statement_timeout_ms=timeout_ms)
            async with credits_of(settings) as credits:
                count, account = await steady_round_trips(
                    relay, lambda: credits.deduct_credits("steady", 1)
                )
        assert count == expected
        assert account.available_credits == 6

    async def test_every_run_of_a_statement_carries_its_own_text_to_be_parsed(
        self, bounced_url: str
    ) -> None:
        """Nothing stays prepared on PgBouncer's server connections, which each
        transaction may get another of: a run relying on a statement parsed before could
        land where it is not, or where another client's unnamed statement is."""
        async with relayed(bounced_url) as (url, relay):
            settings = app_settings("pgbouncer", url, db_statement_timeout_ms=0)
            async with credits_of(settings) as credits:
                await credits.deduct_credits("parsed", 1)
                relay.recording = bytearray()
                for _ in range(3):
                    await credits.deduct_credits("parsed", 1)
                sent = bytes(relay.recording)
        assert sent.count(DEDUCT_OWN_KEY.sql.encode()) == 3


class TestMovingState:
    async def test_hand_overs_each_way_and_an_export_imported_again_keep_every_credit(
        self, bounced_url: str
    ) -> None:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        users = [f"mover-{i}" for i in range(20)]
        async with serving(bounced_url) as client:
            await asyncio.gather(*(client.post(f"{CREDITS}/{u}/deduct", json={}) for u in users))
            for backend in ("memory", "database"):  # set-based merges on asyncpg, verified
                body = {"backend": backend, "carry_state": True}
                moved = await client.put("/admin/storage", json=body, headers=admin)
                assert moved.json()["handover"]["mismatches"] == 0
            export = await client.get("/admin/state/export", headers=admin)
            imported = await client.post(
                "/admin/state/import",
                content=export.content,
                headers={**admin, "Content-Type": "application/x-ndjson"},
            )
            assert imported.status_code == 200
            assert imported.json()["mismatches"] == 0
            balances = [(await client.get(f"{CREDITS}/{u}")).json() for u in users]
        assert {account["available_credits"] for account in balances} == {9}


class TestRetention:
    async def test_each_round_runs_and_leaves_no_lock_on_a_server_connection(
        self, bounced_url: str, postgres_server: PostgresServer
    ) -> None:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with serving(bounced_url) as client:
            for _ in range(5):
                # Deductions at the same time, so that PgBouncer hands each transaction
                # whichever server connection is free.
                cleanup, *deductions = await asyncio.gather(
                    client.post("/admin/maintenance/cleanup", headers=admin),
                    *(client.post(f"{CREDITS}/user-{i}/deduct", json={}) for i in range(30)),
                )
                assert cleanup.json()["skipped"] is False
                assert {response.status_code for response in deductions} == {200}
        database = bounced_url.rsplit("/", 1)[1]
        direct = await asyncpg.connect(plain_dsn(postgres_server.url_for(database)))
        try:
            held = await direct.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            )
        finally:
            await direct.close()
        assert held == 0


@asynccontextmanager
async def credits_of(settings: Settings) -> AsyncIterator[CreditService]:
    """The credit service as the application builds it, without its routes."""
    container = build_container(settings)
    try:
        yield container.credit_service()
    finally:
        await container.close()


async def _on_each_server_connection(url: str, sql: str, connections: int = 5) -> list[Any]:
    """`sql`'s value on that many of PgBouncer's server connections: each client in a
    transaction holds one of its own, and between them they see those used before."""
    clients = [
        await asyncpg.connect(plain_dsn(url), statement_cache_size=0) for _ in range(connections)
    ]
    try:
        values = []
        for other in clients:
            await other.execute("BEGIN")
            values.append(await other.fetchval(sql))
        return values
    finally:
        for other in clients:
            await other.close()


class TestStartingWithPreparedStatements:
    @pytest.mark.parametrize("migrate", [True, False], ids=["migrating", "not-migrating"])
    async def test_start_up_says_the_connection_was_refused_and_what_to_set(
        self, bounced_url: str, migrate: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = app_settings(
            "pgbouncer",
            bounced_url,
            db_prepared_statements=True,
            run_migrations_on_startup=migrate,
        )
        app = create_app(settings)
        with caplog.at_level(logging.ERROR), pytest.raises(StorageUnavailableError) as refused:
            async with app.router.lifespan_context(app):
                pass
        message = str(refused.value)
        assert "refused the connection (SQLSTATE 08P01)" in message
        assert "DB_PREPARED_STATEMENTS=false" in message
        assert "unreachable" not in message
        assert "unsupported startup parameter: statement_timeout" in caplog.text
