"""Least privilege on PostgreSQL (SPEC §11): the SQL of docs/operations.md, run as
written, makes an owner role that migrates and a service role that only reads and writes
rows; the service runs every path on the latter, which can change no table."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from app.config import Settings
from app.db.engine import create_engine
from app.db.migrate import head_revision, upgrade_to_head
from app.errors import StorageUnavailableError
from tests.conftest import app_settings, plain_dsn
from tests.support.alembic import run_alembic
from tests.support.app_client import running
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[1]
API = "/api/v1"
ADMIN = {"Authorization": "Bearer test-admin-token"}  # conftest's app_settings
ERASURE_KEY = "erasure-key-for-the-tests-0123456789"
# The documented names, replaced by names of this test's own (roles are the whole
# cluster's).
DOCUMENTED_NAMES = ("assistant_owner", "assistant_app", "assistant")
TABLE_CHANGES = (
    "ALTER TABLE user_credits ADD COLUMN note text",
    "DROP TABLE query_cache",
    "TRUNCATE credit_transactions",
    "CREATE TABLE scratch (id int)",
)


def readme_sql() -> list[str]:
    """The SQL blocks of docs/operations.md, "Database roles": cluster first, then database."""
    readme = (ROOT / "docs" / "operations.md").read_text()
    section = readme.split("### Database roles", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.DOTALL)


def statements(block: str, names: dict[str, str]) -> list[str]:
    for name in DOCUMENTED_NAMES:  # longest first: `assistant` is a prefix of the others
        block = re.sub(rf"\b{name}\b", names[name], block)
    code = re.sub(r"--[^\n]*", "", block)  # comments first: they may hold a ";"
    return [chunk.strip() for chunk in code.split(";") if chunk.strip()]


async def execute(url: str, sql: list[str]) -> None:
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        for statement in sql:  # one at a time: CREATE DATABASE refuses a multi-statement string
            await connection.execute(statement)
    finally:
        await connection.close()


@dataclass(frozen=True)
class Roles:
    owner_url: str
    service_url: str


def as_role(server: PostgresServer, database: str, role: str) -> str:
    parts = urlsplit(server.url_for(database))
    netloc = f"{role}:change-me@{parts.hostname}:{parts.port}"  # trust auth on the test cluster
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def roles(postgres_server: PostgresServer) -> AsyncIterator[Roles]:
    """The documented roles and database, under names of this test's own, dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    names = {
        "assistant_owner": f"owner_{suffix}",
        "assistant_app": f"service_{suffix}",
        "assistant": f"roles_{suffix}",
    }
    cluster_sql, database_sql = readme_sql()
    database = names["assistant"]
    await execute(postgres_server.admin_url, statements(cluster_sql, names))
    try:
        await execute(postgres_server.url_for(database), statements(database_sql, names))
        yield Roles(
            owner_url=as_role(postgres_server, database, names["assistant_owner"]),
            service_url=as_role(postgres_server, database, names["assistant_app"]),
        )
    finally:
        await execute(
            postgres_server.admin_url,
            [
                f"DROP DATABASE IF EXISTS {database} WITH (FORCE)",
                f"DROP ROLE IF EXISTS {names['assistant_app']}",
                f"DROP ROLE IF EXISTS {names['assistant_owner']}",
            ],
        )


async def table_owners(url: str) -> set[str]:
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        rows = await connection.fetch(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'public'"
        )
    finally:
        await connection.close()
    return {row["tableowner"] for row in rows}


def role_of(url: str) -> str:
    return urlsplit(url).username or ""


class TestMigratingAsTheOwner:
    def test_alembic_from_the_command_line_migrates_as_the_owner_role(self, roles: Roles) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": roles.service_url,
            "MIGRATION_DATABASE_URL": roles.owner_url,
        }
        done = run_alembic(env, ["upgrade", "head"], ["current"])
        assert f"{head_revision()} (head)" in done.stdout

    async def test_the_service_role_alone_cannot_migrate_and_start_up_says_so(
        self, roles: Roles
    ) -> None:
        settings = app_settings("postgres", roles.service_url)
        with pytest.raises(StorageUnavailableError, match="database migrations failed"):
            async with running(settings):
                pass


class TestServingAsTheServiceRole:
    async def test_every_path_runs_with_row_privileges_alone(self, roles: Roles) -> None:
        settings = app_settings(
            "postgres",
            roles.service_url,
            migration_database_url=roles.owner_url,
            erasure_key=ERASURE_KEY,
        )
        async with running(settings) as (app, client):
            assert await table_owners(roles.owner_url) == {role_of(roles.owner_url)}
            calls = [
                ("POST", f"{API}/credits/ann/deduct", {"amount": 2}),  # the fast path
                ("POST", f"{API}/credits/ann/refund", {"amount": 1}),
                ("POST", f"{API}/credits/ann/upgrade", None),
                ("GET", f"{API}/credits/ann/transactions", None),
                ("PUT", f"{API}/consents/ann", {"terms_accepted": True}),
                ("PATCH", f"{API}/consents/ann", {"marketing_consent": True}),
                ("GET", f"{API}/consents/ann/history", None),
                ("POST", f"{API}/assistant/query", {"user_id": "ann", "query": "red shoes"}),
                ("POST", f"{API}/assistant/query", {"user_id": "ann", "query": "red shoes"}),
                ("GET", "/admin/cache/stats", None),
                ("DELETE", "/admin/cache", None),
                ("PUT", "/admin/storage", {"backend": "memory"}),  # the flag, a hand-over
                ("PUT", "/admin/storage", {"backend": "database"}),
                ("POST", "/admin/maintenance/cleanup", None),
                ("GET", f"{API}/users/ann/export", None),
                ("POST", f"{API}/credits/bob/deduct", {"amount": 1}),
                ("DELETE", f"{API}/users/bob", None),
                ("GET", "/health/ready", None),
            ]
            for method, path, body in calls:
                response = await client.request(method, path, json=body, headers=ADMIN)
                assert response.status_code == 200, (method, path, response.text)
            exported_state = await client.get("/admin/state/export", headers=ADMIN)
            imported = await client.post(
                "/admin/state/import",
                content=exported_state.content,
                headers={**ADMIN, "Content-Type": "application/x-ndjson"},
            )
            assert imported.status_code == 200, imported.text  # staged in temporary tables
            container = app.state.container
            assert container.fast is not None and container.fast.figures["open"] >= 1
            exported = (await client.get(f"{API}/users/ann/export")).json()
            kinds = [row["transaction_type"] for row in exported["transactions"]]
            assert {"deduction", "refund"} <= set(kinds)  # stored, and carried back
            cached = await client.post(
                f"{API}/assistant/query", json={"user_id": "ann", "query": "red shoes"}
            )
            assert cached.json()["cached"] is False  # the cache was cleared above

    async def test_the_service_role_cannot_change_a_table(self, roles: Roles) -> None:
        owner = create_engine(Settings(database_url=roles.owner_url))
        try:
            await upgrade_to_head(owner)
        finally:
            await owner.dispose()
        refused: dict[str, str | None] = {}
        connection = await asyncpg.connect(plain_dsn(roles.service_url))
        try:
            for statement in TABLE_CHANGES:  # each on its own: no transaction spans them
                try:
                    await connection.execute(statement)
                except asyncpg.PostgresError as error:
                    refused[statement] = error.sqlstate
                else:
                    refused[statement] = None
        finally:
            await connection.close()
        assert refused == dict.fromkeys(TABLE_CHANGES, "42501")  # insufficient_privilege
