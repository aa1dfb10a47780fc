"""The migrated PostgreSQL schema, read from its catalogue, is ready to be distributed by
user_id (SPEC §6, revision 3): every table that holds a user's rows is distributed by
user_id in docs/scale-out.md, and has user_id in its primary key and in every unique
index (a distributed PostgreSQL enforces a key only when it holds the distribution
column); every other table is named there too, as a reference table or distributed by its
own key. A table added without its place in docs/scale-out.md fails here."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from app.config import Settings
from app.db.engine import create_engine
from app.db.migrate import upgrade_to_head
from tests.conftest import empty_postgres_database, plain_dsn
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

SCALE_OUT = Path(__file__).resolve().parents[1] / "docs" / "scale-out.md"
# Alembic's own table stays on the coordinator, where migrations run (docs/scale-out.md).
LOCAL = {"alembic_version"}

COLUMNS = """
SELECT table_name, array_agg(column_name::text)
  FROM information_schema.columns
 WHERE table_schema = 'public'
 GROUP BY table_name
"""
# Every unique index, the primary key's and the unique constraints' among them, with its
# columns (an expression has none: it holds no column for the check).
UNIQUE = """
SELECT t.relname, i.indisprimary, ARRAY(
         SELECT a.attname::text FROM unnest(i.indkey) AS k(attnum)
           JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attnum = k.attnum)
  FROM pg_index AS i
  JOIN pg_class AS t ON t.oid = i.indrelid
  JOIN pg_namespace AS n ON n.oid = t.relnamespace
 WHERE n.nspname = 'public' AND i.indisunique
"""


def placements() -> dict[str, str | None]:
    """Each table docs/scale-out.md places: its distribution column, or None for a
    reference table."""
    text = SCALE_OUT.read_text()
    placed: dict[str, str | None] = {}
    for table, column in re.findall(r"create_distributed_table\('(\w+)', '(\w+)'", text):
        assert table not in placed, f"{table} placed twice"
        placed[table] = column
    for table in re.findall(r"create_reference_table\('(\w+)'\)", text):
        assert table not in placed, f"{table} placed twice"
        placed[table] = None
    return placed


async def problems(dsn: str) -> list[str]:
    """What keeps the schema at `dsn` from being distributed as docs/scale-out.md says."""
    connection = await asyncpg.connect(dsn)
    try:
        columns = {table: set(names) for table, names in await connection.fetch(COLUMNS)}
        unique = [tuple(row) for row in await connection.fetch(UNIQUE)]
    finally:
        await connection.close()
    placed = placements()
    found: list[str] = []
    for table in sorted(columns.keys() - LOCAL):
        if table not in placed:
            found.append(f"{table}: not placed in docs/scale-out.md")
            continue
        column = placed[table]
        if "user_id" in columns[table] and column != "user_id":
            found.append(f"{table} holds users' rows but is not distributed by user_id")
        if column is None:
            continue
        keys = [(primary, held) for name, primary, held in unique if name == table]
        if not any(primary for primary, _ in keys):
            found.append(f"{table}: no primary key")
        found += [
            f"{table}: {'primary key' if primary else 'unique index'} {held} lacks {column}"
            for primary, held in keys
            if column not in held
        ]
    found += [f"{table}: placed but not in the schema" for table in placed.keys() - columns]
    return found


@pytest.fixture
async def migrated(postgres_server: PostgresServer) -> AsyncIterator[str]:
    async with empty_postgres_database(postgres_server) as name:
        url = postgres_server.url_for(name)
        engine = create_engine(Settings(database_url=url))
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()
        yield plain_dsn(url)


async def test_every_table_is_placed_and_keyed_by_its_distribution_column(
    migrated: str,
) -> None:
    assert await problems(migrated) == []


@pytest.mark.parametrize(
    "statement",
    [
        # A new user table whose key is its id alone.
        "CREATE TABLE credit_notes (id bigserial PRIMARY KEY, user_id text NOT NULL)",
        # A unique index on a user table without user_id.
        "CREATE UNIQUE INDEX ix_ledger_key ON credit_transactions (idempotency_key)",
        # A unique constraint without user_id.
        "ALTER TABLE user_consents ADD CONSTRAINT uq_consent_time UNIQUE (timestamp)",
    ],
)
async def test_a_key_without_user_id_fails_the_check(migrated: str, statement: str) -> None:
    connection = await asyncpg.connect(migrated)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()
    assert await problems(migrated)
