"""What the SQL repositories share: the unit of work and dialect-aware INSERT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One unit of work: commits when the block ends, rolls back when it raises.
    Retries and error translation wrap the whole unit (app/resilience.py)."""
    async with engine.begin() as connection:
        yield connection


def insert(connection: AsyncConnection, table: Table) -> Any:
    """INSERT with ON CONFLICT support for the connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
