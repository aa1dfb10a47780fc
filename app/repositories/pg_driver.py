"""Single statements on asyncpg connections drawn from the engine's own pool.

The hot path of PostgreSQL credit operations is one statement each, and what costs
is the Python around it. On the benchmark machine (README, "Performance") SQLAlchemy's
execution layer costs about 350 µs of CPU per statement against asyncpg's 50-80 µs, and
a checkout and check-in of its pool (or of asyncpg's own) about 70 µs more. So these
statements go straight to asyncpg, prepared once per connection, on connections kept
checked out of the engine's pool between calls while calls keep coming.

They stay the engine's connections: made with its connect arguments, counted against
DB_POOL_SIZE + DB_MAX_OVERFLOW, handed back when unused for a moment, when the pool
runs short, or after DB_POOL_RECYCLE seconds (the pool then recycles them as it does
its own), invalidated through it when broken, and all handed back at shutdown. The
few lines of keeping them are ours because no pool on offer checks out in less than
those 70 µs.

The server ends a statement at its statement_timeout; the client gives up on one the
server has not answered `answer_timeout` seconds after it was sent (a host gone
silent, a stopped backend). asyncpg's own bound for that (its command_timeout) arms
and cancels a timer per statement, which cost a tenth of the deduction's Python
(bench/); here one periodic check watches every statement in flight instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from weakref import WeakKeyDictionary

import asyncpg

# asyncpg's marker for "no client-side timeout", which its own connection code passes
# for internal statements; exported by asyncpg.protocol, but not documented.
from asyncpg.protocol import NO_TIMEOUT
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

# A connection taken from the pool: the pool's proxy, its asyncpg connection, that
# connection's prepared statements, when it was taken from the pool, and when its
# last statement started.
_Held = tuple[PoolProxiedConnection, asyncpg.Connection, dict[str, Any], float, float]


class DriverStatements:
    """Runs one statement at a time in autocommit on a pooled asyncpg connection.

    A connection is kept for the next call only while the pool still has room for
    everyone else (fewer than `pool_limit` checked out, DB_POOL_SIZE + DB_MAX_OVERFLOW),
    and one left unused for `idle_seconds` goes back to the pool: the general path
    never waits long on connections held idle here. Errors are asyncpg's own, raised as
    they come (app/resilience.py classifies them); a statement unanswered for
    `answer_timeout` seconds (None: no bound) raises TimeoutError. A connection whose
    state is unknown after an error (anything but an error the server reported on a
    live connection: a reset socket, a timeout, a cancellation) is invalidated, never
    handed on.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        pool_limit: int,
        recycle_seconds: float,
        answer_timeout: float | None,
        idle_seconds: float = 0.05,
    ) -> None:
        self._engine = engine
        self._pool_limit = pool_limit
        self._recycle = recycle_seconds if recycle_seconds > 0 else math.inf  # -1: never
        self._answer_timeout = answer_timeout or math.inf
        self._idle_seconds = idle_seconds
        self._idle: list[_Held] = []  # held between calls, warmest on top
        # Statements in flight: their connection and when the client gives up on them.
        self._in_flight: dict[asyncpg.Connection, float] = {}
        self._given_up: set[asyncpg.Connection] = set()
        self._watch: asyncio.TimerHandle | None = None
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
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        while self._idle:
            await _check_in(self._idle.pop()[0])
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)

    async def _run(self, sql: str, args: tuple[Any, ...]) -> list[asyncpg.Record]:
        """Runs the statement, prepared once per connection: our own prepared statements,
        not asyncpg's statement cache behind conn.fetch, whose look-up and wrapping cost
        a tenth of the call's Python. The steady state stays synchronous up to the
        statement itself: each coroutine on this path is a measurable part of the call."""
        held = self._idle.pop() if self._idle else None
        if held is None or held[1].is_closed():
            held = await self._checkout(held)
        pooled, driver, statements, _, _ = held
        started = time.monotonic()
        self._in_flight[driver] = started + self._answer_timeout
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self._idle_seconds, self._check)
        try:
            statement = statements.get(sql)
            if statement is None:
                statement = statements[sql] = await driver.prepare(sql)
            try:
                rows: list[asyncpg.Record] = await statement.fetch(*args, timeout=NO_TIMEOUT)
            except asyncpg.InvalidCachedStatementError:
                # A migration changed what the statement reads: prepare it anew, once.
                statement = statements[sql] = await driver.prepare(sql)
                rows = await statement.fetch(*args, timeout=NO_TIMEOUT)
        except BaseException as error:
            del self._in_flight[driver]
            await self._after_error(held, error)
            raise
        del self._in_flight[driver]
        if self._given_up and driver in self._given_up:
            # Answered just as the check gave up on it: the rows stand, the connection
            # is closed.
            self._given_up.discard(driver)
            await _discard(pooled)
        elif not self._hold(held, started):
            await _check_in(pooled)
        return rows

    def _hold(self, held: _Held, used_at: float) -> bool:
        """Keeps the connection for the next call, unless it is due for recycling or the
        pool has no room left for others (then the caller hands it back)."""
        pooled, driver, statements, taken_at, _ = held
        # Through sync_engine each time: dispose() gives the engine a new pool.
        pool: Any = self._engine.sync_engine.pool
        if used_at - taken_at < self._recycle and pool.checkedout() < self._pool_limit:
            self._idle.append((pooled, driver, statements, taken_at, used_at))
            return True
        return False

    async def _checkout(self, dead: _Held | None) -> _Held:
        """A live connection: a held one, else one from the pool. asyncpg closes a
        connection whose server went away while it sat idle: each such one (`dead`
        first) is discarded (a check costing no round trip, unlike a pre-ping), until a
        live or a new one comes, or connecting fails (a transient fault for the retries)."""
        while True:
            if dead is not None:
                await _discard(dead[0])
            if self._idle:
                held = self._idle.pop()
            else:
                pooled = await self._engine.raw_connection()
                driver = pooled.driver_connection
                statements = self._prepared.get(driver)
                if statements is None:
                    statements = self._prepared[driver] = {}
                held = (pooled, driver, statements, time.monotonic(), 0.0)
            if not held[1].is_closed():
                return held
            dead = held

    async def _after_error(self, held: _Held, error: BaseException) -> None:
        """Hands the connection back, or invalidates it; raises TimeoutError for a
        statement the client gave up on."""
        pooled, driver = held[0], held[1]
        if driver in self._given_up:
            self._given_up.discard(driver)
            await _discard(pooled, error)
            raise TimeoutError(
                f"the database did not answer within {self._answer_timeout:g} s"
            ) from error
        if not _connection_is_sound(driver, error):
            await _discard(pooled, error)
        elif not self._hold(held, time.monotonic()):
            await _check_in(pooled)

    def _check(self) -> None:
        """Every `idle_seconds` while connections are held or statements in flight: gives
        up on statements past their time (closing the connection fails the call at
        once), and hands back connections unused for `idle_seconds`, coldest first."""
        self._watch = None
        now = time.monotonic()
        for driver, deadline in self._in_flight.items():
            if deadline <= now and driver not in self._given_up:
                self._given_up.add(driver)
                driver.terminate()
        cutoff = now - self._idle_seconds
        while self._idle and self._idle[0][4] <= cutoff:
            task = asyncio.get_running_loop().create_task(_check_in(self._idle.pop(0)[0]))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)
        if self._idle or self._in_flight:
            self._watch = asyncio.get_running_loop().call_later(self._idle_seconds, self._check)


async def _check_in(pooled: PoolProxiedConnection) -> None:
    # Checking in may close the connection (an overflow or invalidated one), which
    # awaits the driver: that needs SQLAlchemy's greenlet context.
    await greenlet_spawn(pooled.close)


async def _discard(pooled: PoolProxiedConnection, error: BaseException | None = None) -> None:
    """Invalidates the connection (the pool closes it and makes a new one when needed)."""
    await greenlet_spawn(pooled.invalidate, error)
    await _check_in(pooled)


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
