"""The Alembic revisions on SQLite and PostgreSQL: up, down, up again; models in step;
data kept across upgrades; replicas migrating one empty database at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings, StorageBackend
from app.db.engine import create_engine
from app.db.migrate import alembic_config, current_revision, head_revision, upgrade_to_head
from app.errors import IdempotencyKeyReusedError
from app.models import Base
from app.repositories.database import sql_stores
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.switching.cluster_flag import FlagStore, StoredFlag
from tests.conftest import RULES, empty_postgres_database
from tests.support.alembic import ALEMBIC, run_alembic
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "user_credits",
    "credit_transactions",
    "credit_idempotency_keys",
    "user_consents",
    "query_cache",
    "storage_flag",
    "consent_events",
    "credit_erasures",
}
# Keyed by (user_id, id) on PostgreSQL and by id, SQLite's rowid, on SQLite (migration 0009).
ROWID_KEYED = ("credit_transactions", "consent_events")
EMPTY_DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=EMPTY_DATABASES)
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    async with empty_postgres_database(request.getfixturevalue("postgres_server")) as name:
        yield request.getfixturevalue("postgres_server").url_for(name)


@pytest.fixture
async def empty_engine(empty_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=empty_url))
    yield engine
    await engine.dispose()


async def alembic(engine: AsyncEngine, action: str, target: str) -> None:
    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        getattr(command, action)(config, target)

    async with engine.connect() as connection:
        await connection.run_sync(run)


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))


class TestUpAndDown:
    async def test_upgrade_downgrade_and_upgrade_again_leave_a_working_schema(
        self, empty_engine: AsyncEngine
    ) -> None:
        await alembic(empty_engine, "upgrade", "head")
        assert await table_names(empty_engine) >= TABLES
        assert await current_revision(empty_engine) == head_revision()

        await alembic(empty_engine, "downgrade", "base")
        assert not TABLES & await table_names(empty_engine)
        assert await current_revision(empty_engine) is None

        await alembic(empty_engine, "upgrade", "head")
        credits = CreditService(sql_stores(empty_engine, RULES).credits)
        account = await credits.deduct_credits("after-roundtrip", 2, idempotency_key="k")
        assert account.available_credits == 8

    async def test_upgrading_an_up_to_date_schema_changes_nothing(
        self, empty_engine: AsyncEngine
    ) -> None:
        await upgrade_to_head(empty_engine)
        await upgrade_to_head(empty_engine)
        assert await current_revision(empty_engine) == head_revision()


class TestModelsMatchMigrations:
    async def test_the_orm_models_describe_the_migrated_schema(
        self, empty_engine: AsyncEngine
    ) -> None:
        await upgrade_to_head(empty_engine)

        def differences(connection: Connection) -> list[object]:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))

        async with empty_engine.connect() as connection:
            assert await connection.run_sync(differences) == []

    async def test_every_table_has_the_models_primary_key(self, empty_engine: AsyncEngine) -> None:
        # Alembic's comparison leaves primary keys out.
        await upgrade_to_head(empty_engine)

        def keys(connection: Connection) -> dict[str, list[str]]:
            inspector = inspect(connection)
            return {
                name: inspector.get_pk_constraint(name)["constrained_columns"]
                for name in Base.metadata.tables
            }

        async with empty_engine.connect() as connection:
            found = await connection.run_sync(keys)
        expected = {
            name: [column.name for column in table.primary_key]
            for name, table in Base.metadata.tables.items()
        }
        if empty_engine.dialect.name == "sqlite":
            expected.update({table: ["id"] for table in ROWID_KEYED})  # app/models.py, LedgerId
        assert found == expected


class TestDataSurvivesUpgrades:
    async def test_rows_written_at_the_first_revision_are_served_after_upgrading(
        self, empty_engine: AsyncEngine
    ) -> None:
        await alembic(empty_engine, "upgrade", "0001")
        written = datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
        async with empty_engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,"
                    " last_reset_timestamp, created_at, updated_at)"
                    " VALUES ('veteran', false, 42, 50, :at, :at, :at)"
                ).bindparams(
                    at=written.replace(tzinfo=None) if _is_sqlite(connection) else written
                ),
            )
            await connection.execute(
                text(
                    "INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp,"
                    " description) VALUES ('veteran', 'deduction', -8, :at, 'before the upgrade')"
                ).bindparams(
                    at=written.replace(tzinfo=None) if _is_sqlite(connection) else written
                ),
            )
        await upgrade_to_head(empty_engine)

        def clock() -> datetime:
            return datetime(2026, 11, 1, 9, 0, tzinfo=UTC)

        credits = CreditService(sql_stores(empty_engine, RULES).credits, clock=clock)
        account = await credits.get_user_credits("veteran")
        assert (account.available_credits, account.is_guest) == (42, False)
        assert account.last_reset_timestamp == written
        (row,) = await credits.get_transaction_history("veteran")
        assert (row.amount, row.description, row.timestamp) == (-8, "before the upgrade", written)
        assert (
            await credits.deduct_credits("veteran", 2, idempotency_key="new")
        ).available_credits == 40


class TestLedgerKeys:
    async def test_0004_keeps_every_rows_key_down_and_up_again(
        self, empty_engine: AsyncEngine
    ) -> None:
        await upgrade_to_head(empty_engine)
        credits = CreditService(sql_stores(empty_engine, RULES).credits)
        await credits.deduct_credits("keeper", 2, idempotency_key="client-key")
        await credits.refund_credits("keeper", 1, idempotency_key="refund-key")
        rows = "SELECT {} FROM credit_transactions ORDER BY id"

        await alembic(empty_engine, "downgrade", "0003")
        async with empty_engine.connect() as connection:
            kept = (await connection.execute(text(rows.format("call_key")))).scalars().all()
        assert kept == ["client-key", "refund-key"]

        await alembic(empty_engine, "upgrade", "head")
        async with empty_engine.connect() as connection:
            kept = (await connection.execute(text(rows.format("idempotency_key")))).scalars()
            assert kept.all() == ["client-key", "refund-key"]
        again = await credits.deduct_credits("keeper", 2, idempotency_key="client-key")
        assert again.available_credits == 9


class TestStorageFlag:
    async def test_0005_down_keeps_every_other_row_and_up_again_stores_the_flag(
        self, empty_engine: AsyncEngine
    ) -> None:
        await upgrade_to_head(empty_engine)
        credits = CreditService(sql_stores(empty_engine, RULES).credits)
        await credits.deduct_credits("stays", 3, idempotency_key="k")
        flags = FlagStore(empty_engine)
        await flags.save(StoredFlag(StorageBackend.DATABASE, None, True, 4))

        await alembic(empty_engine, "downgrade", "0004")
        assert "storage_flag" not in await table_names(empty_engine)
        account = await credits.get_user_credits("stays")
        assert account.available_credits == 7
        assert len(await credits.get_transaction_history("stays")) == 1

        await alembic(empty_engine, "upgrade", "head")
        assert await flags.load() is None
        await flags.save(StoredFlag(StorageBackend.MEMORY, StorageBackend.DATABASE, False, 1))
        assert await flags.load() == StoredFlag(
            StorageBackend.MEMORY, StorageBackend.DATABASE, False, 1
        )
        assert (
            await credits.deduct_credits("stays", 3, idempotency_key="k")
        ).available_credits == 7


class TestKeyRequests:
    async def test_0006_carries_every_key_over_as_a_deduction_key_down_and_up_again(
        self, empty_engine: AsyncEngine
    ) -> None:
        await upgrade_to_head(empty_engine)
        credits = CreditService(sql_stores(empty_engine, RULES).credits)
        await credits.deduct_credits("holder", 3, idempotency_key="paid")
        await credits.refund_credits("holder", 1, idempotency_key="returned")
        keys = "SELECT idempotency_key FROM credit_idempotency_keys ORDER BY idempotency_key"

        await alembic(empty_engine, "downgrade", "0005")
        async with empty_engine.connect() as connection:
            assert (await connection.execute(text(keys))).scalars().all() == ["paid", "returned"]
            # A key claimed while the schema stood at 0005.
            await connection.execute(
                text(
                    "INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at)"
                    " VALUES ('holder', 'older', :at)"
                ),
                {"at": datetime.now(UTC)},
            )
            await connection.commit()

        await alembic(empty_engine, "upgrade", "head")
        claims = "SELECT idempotency_key, operation, request FROM credit_idempotency_keys"
        async with empty_engine.connect() as connection:
            rows = sorted(tuple(row) for row in await connection.execute(text(claims)))
        assert rows == [
            ("older", "deduction", None),
            ("paid", "deduction", None),
            ("returned", "deduction", None),
        ]
        # A carried key answers a deduction as a repeat, whatever its amount, and refuses a
        # refund; keys claimed from now on keep their request.
        assert (await credits.deduct("holder", 5, idempotency_key="paid")).replayed
        with pytest.raises(IdempotencyKeyReusedError):
            await credits.refund_credits("holder", 1, idempotency_key="returned")
        await credits.deduct_credits("holder", 2, idempotency_key="new")
        with pytest.raises(IdempotencyKeyReusedError):
            await credits.deduct_credits("holder", 1, idempotency_key="new")
        assert (await credits.get_user_credits("holder")).available_credits == 6


class TestConsentHistory:
    async def test_0007_backfills_one_event_per_consent_and_down_keeps_every_consent(
        self, empty_engine: AsyncEngine
    ) -> None:
        await alembic(empty_engine, "upgrade", "0006")
        at = datetime(2026, 3, 1, tzinfo=UTC)
        async with empty_engine.begin() as connection:
            for user, accepted in (("yes", True), ("no", False)):
                await connection.execute(
                    text(
                        "INSERT INTO user_consents (user_id, terms_accepted, marketing_consent,"
                        " timestamp, updated_at) VALUES (:user, :accepted, true, :at, :at)"
                    ),
                    {"user": user, "accepted": accepted, "at": at},
                )

        await alembic(empty_engine, "upgrade", "head")
        consents = UserConsentService(sql_stores(empty_engine, RULES).consents)
        assert await consents.has_accepted_terms("yes")  # version "1", the terms there were
        assert not await consents.has_accepted_terms("no")
        events = await consents.consent_history("yes")
        assert [(e.terms_accepted, e.terms_version, e.recorded_at) for e in events] == [
            (True, "1", at)
        ]
        assert [e.terms_version for e in await consents.consent_history("no")] == [None]
        await consents.update_marketing_consent("yes", False)

        await alembic(empty_engine, "downgrade", "0006")
        assert "consent_events" not in await table_names(empty_engine)
        async with empty_engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT user_id, terms_accepted, marketing_consent FROM user_consents")
            )
            assert sorted(tuple(row) for row in rows) == [("no", False, True), ("yes", True, False)]

        await alembic(empty_engine, "upgrade", "head")
        assert len(await consents.consent_history("yes")) == 1  # the consent as it is now


class TestErasuresByTime:
    async def test_0008_indexes_erasures_by_time_and_down_keeps_every_erasure(
        self, empty_engine: AsyncEngine
    ) -> None:
        await alembic(empty_engine, "upgrade", "0007")
        at = datetime(2026, 3, 1, tzinfo=UTC)
        async with empty_engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO credit_erasures (pseudonym, is_guest, available_credits,"
                    " max_credits, last_reset_timestamp, erased_at)"
                    " VALUES ('erased-1', true, 4, 10, :at, :at)"
                ),
                {"at": at},
            )

        async def erasures() -> list[tuple[Any, ...]]:
            async with empty_engine.connect() as connection:
                rows = await connection.execute(
                    text("SELECT pseudonym, available_credits FROM credit_erasures")
                )
                return [tuple(row) for row in rows]

        async def indexed() -> bool:
            async with empty_engine.connect() as connection:
                indexes = await connection.run_sync(
                    lambda sync: inspect(sync).get_indexes("credit_erasures")
                )
            return any(index["column_names"] == ["erased_at"] for index in indexes)

        await alembic(empty_engine, "upgrade", "head")
        assert await indexed()
        assert await erasures() == [("erased-1", 4)]
        await alembic(empty_engine, "downgrade", "0007")
        assert not await indexed()
        assert await erasures() == [("erased-1", 4)]
        await alembic(empty_engine, "upgrade", "head")
        assert await indexed()

    async def test_0010_records_every_erasure_and_down_keeps_those_with_an_account(
        self, empty_engine: AsyncEngine
    ) -> None:
        await alembic(empty_engine, "upgrade", "0009")
        at = datetime(2026, 3, 1, tzinfo=UTC)
        insert = text(
            "INSERT INTO credit_erasures (pseudonym, is_guest, available_credits,"
            " max_credits, last_reset_timestamp, erased_at)"
            " VALUES (:pseudonym, :guest, :available, :maximum, :at, :at)"
        )
        async with empty_engine.begin() as connection:
            await connection.execute(
                insert,
                {"pseudonym": "!erased:1", "guest": True, "available": 4, "maximum": 10, "at": at},
            )

        async def erasures() -> list[tuple[Any, ...]]:
            async with empty_engine.connect() as connection:
                rows = await connection.execute(
                    text("SELECT pseudonym, available_credits FROM credit_erasures ORDER BY 1")
                )
                return [tuple(row) for row in rows]

        await alembic(empty_engine, "upgrade", "head")
        assert "handover_marks" not in await table_names(empty_engine)
        async with empty_engine.begin() as connection:  # a user erased with a consent alone
            await connection.execute(
                insert,
                {
                    "pseudonym": "!erased:2",
                    "guest": None,
                    "available": None,
                    "maximum": None,
                    "at": at,
                },
            )
        assert await erasures() == [("!erased:1", 4), ("!erased:2", None)]
        await alembic(empty_engine, "downgrade", "0009")
        assert "handover_marks" in await table_names(empty_engine)
        assert await erasures() == [("!erased:1", 4)]  # docs/operations.md says what is lost
        await alembic(empty_engine, "upgrade", "head")
        assert await erasures() == [("!erased:1", 4)]


class TestUserKeys:
    async def test_0009_keys_user_rows_by_user_and_keeps_every_row_down_and_up_again(
        self, empty_engine: AsyncEngine
    ) -> None:
        await alembic(empty_engine, "upgrade", "0008")
        stores = sql_stores(empty_engine, RULES)
        credits = CreditService(stores.credits)
        consents = UserConsentService(stores.consents)
        for user in ("ann", "bob"):
            await credits.deduct_credits(user, 2, idempotency_key=f"{user}-1")
            await consents.record_consent(user, terms_accepted=True)
        await credits.refund_credits("ann", 1)
        await consents.update_marketing_consent("bob", True)
        rows = (
            "SELECT id, user_id, transaction_type, amount FROM credit_transactions ORDER BY id",
            "SELECT id, user_id, marketing_consent FROM consent_events ORDER BY id",
        )

        async def snapshot() -> list[list[tuple[Any, ...]]]:
            async with empty_engine.connect() as connection:
                return [
                    [tuple(row) for row in await connection.execute(text(query))] for query in rows
                ]

        async def keys() -> list[list[str]]:
            async with empty_engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: [
                        inspect(sync).get_pk_constraint(table)["constrained_columns"]
                        for table in ROWID_KEYED
                    ]
                )

        user_key = ["id"] if empty_engine.dialect.name == "sqlite" else ["user_id", "id"]
        seeded = await snapshot()
        assert len(seeded[0]) == 3 and len(seeded[1]) == 3

        await alembic(empty_engine, "upgrade", "0009")
        assert await keys() == [user_key, user_key]
        assert await snapshot() == seeded
        await alembic(empty_engine, "downgrade", "0008")
        assert await keys() == [["id"], ["id"]]
        assert await snapshot() == seeded
        await alembic(empty_engine, "upgrade", "head")
        assert await keys() == [user_key, user_key]
        assert await snapshot() == seeded

        # New rows are numbered after the old ones, and each user's history reads in order.
        await credits.deduct_credits("ann", 3, idempotency_key="ann-2")
        await consents.update_marketing_consent("ann", True)
        ledger, events = await snapshot()
        assert ledger[-1][0] > seeded[0][-1][0] and events[-1][0] > seeded[1][-1][0]
        history = await credits.get_transaction_history("ann")
        assert [row.amount for row in history] == [-3, 1, -2]
        assert [e.marketing_consent for e in await consents.consent_history("ann")] == [
            True,
            False,
        ]
        assert (await credits.deduct("ann", 2, idempotency_key="ann-1")).replayed
        assert (await credits.get_user_credits("ann")).available_credits == 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_ready(port: int, process: subprocess.Popen[str], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"replica on port {port} exited: {process.communicate()[1]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/health/ready", timeout=2
            ) as reply:
                return json.load(reply)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"replica on port {port} not ready within {timeout} s")


def _is_sqlite(connection: object) -> bool:
    return connection.dialect.name == "sqlite"


class TestCommandLine:
    def test_alembic_upgrade_and_downgrade_work_from_the_repository_root(
        self, empty_url: str
    ) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": empty_url.replace("+asyncpg", "").replace("+aiosqlite", ""),
        }
        done = run_alembic(
            env, ["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"], ["current"]
        )
        assert f"{head_revision()} (head)" in done.stdout


@pytest.mark.postgres
class TestReplicasStartingTogether:
    def test_three_servers_starting_at_once_on_an_empty_database_all_come_up(
        self, postgres_database: tuple[PostgresServer, str]
    ) -> None:
        server, name = postgres_database
        ports = [_free_port() for _ in range(3)]
        env = {**os.environ, "DATABASE_URL": server.url_for(name), "LOG_LEVEL": "WARNING"}
        replicas = [
            subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=ROOT,
                env={**env, "PORT": str(port)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for port in ports
        ]
        try:
            for port, replica in zip(ports, replicas, strict=True):
                body = _wait_until_ready(port, replica)
                assert body["database"]["revision"] == head_revision()
        finally:
            for replica in replicas:
                replica.terminate()
            for replica in replicas:
                replica.communicate(timeout=30)

    def test_three_alembic_processes_at_once_on_an_empty_database_all_succeed(
        self, postgres_database: tuple[PostgresServer, str]
    ) -> None:
        server, name = postgres_database
        env = {**os.environ, "DATABASE_URL": server.url_for(name)}
        processes = [
            subprocess.Popen(
                [ALEMBIC, "upgrade", "head"],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr
