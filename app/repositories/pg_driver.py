"""Single statements on asyncpg connections drawn from the engine's own pool.

The hot path of PostgreSQL credit operations is one statement each, and what costs
is the Python around it. On the benchmark machine (README, "Performance") SQLAlchemy's
execution layer costs about 350 µs of CPU per statement against asyncpg's 50-80 µs, and
a checkout and check-in of its pool (or of asyncpg's own) about 70 µs more. So these
statements go straight to asyncpg, prepared once per connection, on connections kept
checked out of the engine's pool between calls while calls keep coming.

They stay the engine's connections: made with its connect arguments (statement
timeout included), counted against DB_POOL_SIZE + DB_MAX_OVERFLOW, handed back when
unused for a moment, when the pool runs short, or after DB_POOL_RECYCLE seconds (the
pool then recycles them as it does its own), invalidated through it when broken, and
all handed back at shutdown. The few lines of keeping them are ours because no pool on
offer checks out in less than those 70 µs.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from weakref import WeakKeyDictionary

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn


class DriverStatements:
    """Runs one statement at a time in autocommit on a pooled asyncpg connection.

    A connection is kept for the next call only while the pool still has room for
    everyone else (fewer than `pool_limit` checked out, DB_POOL_SIZE + DB_MAX_OVERFLOW),
    and one left unused for `idle_seconds` goes back to the pool: the general path
    never waits long on connections held idle here. Errors are asyncpg's own, raised as
    they come (app/resilience.py classifies them). A connection whose state is unknown
    after an error (anything but an error the server reported on a live connection: a
    reset socket, a timeout, a cancellation) is invalidated, never handed on.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        pool_limit: int,
        recycle_seconds: float,
        idle_seconds: float = 0.05,
    ) -> None:
        self._engine = engine
        self._pool_limit = pool_limit
        self._recycle = recycle_seconds if recycle_seconds > 0 else math.inf  # -1: never
        self._idle_seconds = idle_seconds
        # Held connections, warmest on top: (pooled, its asyncpg connection, when taken
        # from the pool, when last released).
        self._idle: list[tuple[PoolProxiedConnection, asyncpg.Connection, float, float]] = []
        self._sweep: asyncio.TimerHandle | None = None
        # Each connection's prepared statements, forgotten with the connection.
        self._prepared: WeakKeyDictionary[asyncpg.Connection, dict[str, Any]] = WeakKeyDictionary()
        self._returning: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> int:
        """Connections held for the next call (the pool counts them as in use)."""
        return len(self._idle)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        # fetch, not fetchrow: a row limit makes the server keep a portal open for a
        # statement that has run to its end anyway.
        rows = await self._run(sql, args)
        return rows[0] if rows else None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(sql, args)

    async def close(self) -> None:
        """Hands every held connection back to the pool (before the engine is disposed)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            await _check_in(self._idle.pop()[0])
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)

    async def _run(self, sql: str, args: tuple[Any, ...]) -> list[asyncpg.Record]:
        pooled, driver, since = await self._checkout()
        try:
            result = await self._execute(driver, sql, args)
        except BaseException as error:
            if _connection_is_sound(driver, error):
                await self._release(pooled, driver, since)
            else:
                await greenlet_spawn(pooled.invalidate, error)
                await _check_in(pooled)
            raise
        await self._release(pooled, driver, since)
        return result

    async def _execute(
        self, driver: asyncpg.Connection, sql: str, args: tuple[Any, ...]
    ) -> list[asyncpg.Record]:
        """Runs the statement prepared once per connection. Our own prepared statements,
        not asyncpg's statement cache behind conn.fetch: the cache's look-up and wrapping
        cost a tenth of the call's Python."""
        statements = self._prepared.get(driver)
        if statements is None:
            statements = self._prepared[driver] = {}
        statement = statements.get(sql)
        if statement is None:
            statement = statements[sql] = await driver.prepare(sql)
        try:
            rows: list[asyncpg.Record] = await statement.fetch(*args)
        except asyncpg.InvalidCachedStatementError:
            # A migration changed what the statement reads: prepare it anew, once.
            statement = statements[sql] = await driver.prepare(sql)
            rows = await statement.fetch(*args)
        return rows

    async def _checkout(self) -> tuple[PoolProxiedConnection, asyncpg.Connection, float]:
        """A live connection: a held one, else one from the pool. asyncpg closes a
        connection whose server went away while it sat idle: each such one is
        discarded (a check costing no round trip, unlike a pre-ping), until a live or
        a new one comes, or connecting fails (a transient fault for the retries)."""
        while True:
            if self._idle:
                pooled, driver, since, _ = self._idle.pop()
            else:
                pooled, since = await self._engine.raw_connection(), time.monotonic()
                driver = pooled.driver_connection
            if not driver.is_closed():
                return pooled, driver, since
            await greenlet_spawn(pooled.invalidate)
            await _check_in(pooled)

    async def _release(
        self, pooled: PoolProxiedConnection, driver: asyncpg.Connection, since: float
    ) -> None:
        now = time.monotonic()
        pool: Any = self._engine.pool
        if now - since < self._recycle and pool.checkedout() < self._pool_limit:
            self._idle.append((pooled, driver, since, now))
            if self._sweep is None:
                loop = asyncio.get_running_loop()
                self._sweep = loop.call_later(self._idle_seconds, self._return_unused)
        else:
            await _check_in(pooled)

    def _return_unused(self) -> None:
        """Hands back the connections idle for `idle_seconds` (the coldest, at the bottom)."""
        self._sweep = None
        cutoff = time.monotonic() - self._idle_seconds
        while self._idle and self._idle[0][3] <= cutoff:
            task = asyncio.get_running_loop().create_task(_check_in(self._idle.pop(0)[0]))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(
                self._idle_seconds, self._return_unused
            )


async def _check_in(pooled: PoolProxiedConnection) -> None:
    # Checking in may close the connection (an overflow or invalidated one), which
    # awaits the driver: that needs SQLAlchemy's greenlet context.
    await greenlet_spawn(pooled.close)


def _connection_is_sound(driver: asyncpg.Connection, error: BaseException) -> bool:
    """Only an error the server reported about the statement leaves the connection fit
    for the next call. Connection and shutdown errors (classes 08, 57P) come just before
    the server closes it, before asyncpg has noticed: never sound."""
    state = getattr(error, "sqlstate", None) or ""
    return (
        isinstance(error, asyncpg.PostgresError)
        and not state.startswith(("08", "57P"))
        and not driver.is_closed()
        and not driver.is_in_transaction()
    )
