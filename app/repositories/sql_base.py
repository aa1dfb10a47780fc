"""What the SQL repositories share: the unit of work and dialect-aware INSERT."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Table
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import StorageUnavailableError

logger = logging.getLogger(__name__)

# Failures that say "the database cannot serve now", not "this request is wrong".
_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # pool exhausted for DB_POOL_TIMEOUT
    OSError,  # connection refused or reset before the driver wraps it
    TimeoutError,  # connect timeout
)


def is_unavailable(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, _UNAVAILABLE)


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One unit of work: commits when the block ends, rolls back when it raises.

    Connection-level failures become StorageUnavailableError, which the API
    renders as 503 with Retry-After.
    """
    try:
        async with engine.begin() as connection:
            yield connection
    except Exception as error:
        if is_unavailable(error):
            logger.warning("database unavailable: %s", type(error).__name__)
            raise StorageUnavailableError() from error
        raise


def insert(connection: AsyncConnection, table: Table) -> Any:
    """INSERT with ON CONFLICT support for the connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
