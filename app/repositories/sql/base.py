"""What the SQL repositories share: the unit of work and dialect-aware INSERT."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

# Rows per retention batch: small enough that one DELETE stays well under a second.
DEFAULT_BATCH = 5000


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One unit of work: commits when the block ends, rolls back when it raises.
    Retries and error translation wrap the whole unit (app/db/resilience.py)."""
    async with engine.begin() as connection:
        yield connection


@asynccontextmanager
async def snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A read that sees one snapshot across its statements: REPEATABLE READ on PostgreSQL;
    a SQLite transaction is one already."""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            yield conn


async def delete_in_batches(
    engine: AsyncEngine,
    table: Table,
    condition: ColumnElement[bool],
    *,
    key: Sequence[ColumnElement[Any]],
    batch_size: int,
) -> int:
    """DELETE the matching rows `batch_size` at a time, each batch its own short
    transaction, so no statement holds its locks long whatever the table's size."""
    chosen = select(*key).where(condition).limit(batch_size)
    target = key[0] if len(key) == 1 else tuple_(*key)
    statement = delete(table).where(
        target.in_(chosen.scalar_subquery() if len(key) == 1 else chosen)
    )
    total = 0
    while True:
        async with transaction(engine) as connection:
            deleted = int((await connection.execute(statement)).rowcount)
        total += deleted
        if deleted < batch_size:
            return total


def insert(connection: AsyncConnection, table: Table) -> Any:
    """INSERT with ON CONFLICT support for the connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
