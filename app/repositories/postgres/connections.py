"""The fast path's own asyncpg connections: a handful, handed from call to call.

A fast-path statement's own Python costs about as much as the server's work for it, so
each Python layer shows in the throughput (docs/architecture.md). These
connections are asyncpg's, opened with `asyncpg.connect` and used through its
documented API alone: prepared statements made once per connection
(`Connection.prepare`), no client-side timer per statement (`command_timeout=None`,
which asyncpg's own bound would arm and cancel for every statement). They count within
the pool budget (app/db/engine.py takes them out of DB_MAX_OVERFLOW). A call that
finds none free waits its turn, first come first served, and is handed the next one
released, up to `wait_seconds` (DB_POOL_TIMEOUT); only then does `fetch` answer None, and
the caller takes the general path. Sending such calls to the general path at once cost
more than the wait: its transaction of several round trips, on the same event loop,
cut the throughput as soon as calls outnumbered the connections (bench `pgbouncer`,
direct, c=32 against c=8; bench/README.md), while a turn on the fast path comes within a
statement's time. asyncpg's own pool would wait too, but costs a checkout per call.

Behind a transaction pooler (app/db/pooler.py) that keeps no prepared statements
(`prepared=False`) nothing stays prepared on the server: each statement is described once
per connection and then sent with its own Parse every time it runs, still one round trip;
and with a `transaction_setting` (the statement timeout, which cannot be a session
setting there) each statement runs in a transaction begun by that setting, two more
round trips.

The server ends a statement at its statement_timeout; one it never answers (a host
gone silent) is given up `answer_timeout` seconds after it was sent, by a watch that
looks at the connections in use every quarter of that time and terminates the late ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class _Held:
    __slots__ = ("busy_since", "driver", "opened_at", "statements", "timed_out")

    def __init__(self, driver: asyncpg.Connection) -> None:
        self.driver = driver
        self.statements: dict[str, Any] = {}  # SQL → its prepared statement on this connection
        self.opened_at = time.monotonic()
        self.busy_since = 0.0  # 0: not running a statement
        self.timed_out = False


class FastConnections:
    """Up to `size` connections, each running one statement at a time, in autocommit
    (behind a transaction pooler in a transaction of its own, module docstring).

    Errors are asyncpg's own, raised as they come (app/db/resilience.py classifies
    them), but for a statement given up on: TimeoutError. A connection whose state is
    unknown after an error (anything but an error the server reported on a live
    connection) is closed, never used again; one older than `recycle_seconds` too.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        size: int,
        recycle_seconds: float,
        answer_timeout: float | None,
        wait_seconds: float,
        prepared: bool = True,
        transaction_setting: str | None = None,
    ) -> None:
        self._connect = connect
        self._wait_seconds = wait_seconds
        self._prepared = prepared
        # One simple-protocol message: BEGIN and the setting in one round trip.
        self._begin = None if transaction_setting is None else f"BEGIN; {transaction_setting}"
        self.size = size
        self._recycle = recycle_seconds if recycle_seconds > 0 else float("inf")  # -1: never
        self._answer_timeout = answer_timeout
        self._idle: list[_Held] = []
        self._waiting: collections.deque[asyncio.Future[_Held | None]] = collections.deque()
        self._closed = False
        self._open: set[_Held] = set()
        self._opening = 0
        self._watch: asyncio.Task[None] | None = None

    @property
    def figures(self) -> dict[str, int]:
        """For /health/ready: the budget, connections open, and those running a statement."""
        return {
            "size": self.size,
            "open": len(self._open),
            "busy": len(self._open) - len(self._idle),
        }

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        """The statement's rows; None, sending nothing, when no connection came free
        within `wait_seconds`."""
        held = await self._taken()
        if held is None:
            return None
        held.busy_since = time.monotonic()
        try:
            rows = await self._run(held, sql, args)
        except BaseException as error:
            held.busy_since = 0.0
            if held.timed_out:
                self._drop(held)
                raise TimeoutError(
                    f"the database did not answer within {self._answer_timeout:g} s"
                ) from error
            if _is_sound(held.driver, error):
                self._release(held)
            else:
                self._drop(held)
            raise
        held.busy_since = 0.0
        if time.monotonic() - held.opened_at < self._recycle:
            self._release(held)
        else:
            self._drop(held)
        return rows

    async def _taken(self) -> _Held | None:
        """An idle connection, a new one within the budget, or the first one released
        while this call waits its turn (first come, first served); None after
        `wait_seconds` without one."""
        while self._idle:
            held = self._idle.pop()
            if not held.driver.is_closed():  # else the server went away meanwhile
                return held
            self._drop(held)
        if len(self._open) + self._opening < self.size:
            return await self._opened()
        turn: asyncio.Future[_Held | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout(self._wait_seconds):
                given = await turn
        except BaseException as error:  # the wait ran out, or the call was cancelled
            if turn.done() and not turn.cancelled():  # given its turn meanwhile: pass it on
                given = turn.result()
                if given is None:
                    self._pass_on(None)
                else:
                    self._release(given)
            if isinstance(error, TimeoutError):
                return None
            raise
        if given is None:  # room in the budget, unless the connections are closing
            return None if self._closed else await self._opened()
        return given

    def _release(self, held: _Held) -> None:
        """`held` to the first call waiting, else to the idle ones."""
        if not self._pass_on(held):
            self._idle.append(held)

    def _pass_on(self, held: _Held | None) -> bool:
        """Hands `held` (None: room in the budget for a new one) to the first call still
        waiting; False when none is."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(held)
                return True
        return False

    async def _run(self, held: _Held, sql: str, args: tuple[Any, ...]) -> list[asyncpg.Record]:
        if self._begin is None:
            return await self._fetch(held, sql, args)
        driver = held.driver
        await driver.execute(self._begin)
        try:
            rows = await self._fetch(held, sql, args)
        except asyncpg.PostgresError:
            # After the server's refusal the connection is sound once rolled back; one
            # the rollback fails on stays in its transaction, and is dropped (_is_sound).
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await driver.execute("ROLLBACK")
            raise
        await driver.execute("COMMIT")
        return rows

    async def _fetch(self, held: _Held, sql: str, args: tuple[Any, ...]) -> list[asyncpg.Record]:
        statement = held.statements.get(sql)
        if statement is None:
            statement = held.statements[sql] = await self._prepare(held.driver, sql)
        rows: list[asyncpg.Record]
        try:
            rows = await statement.fetch(*args)
        except asyncpg.InvalidCachedStatementError:
            # A migration changed what the statement reads: prepare it anew, once.
            statement = held.statements[sql] = await self._prepare(held.driver, sql)
            rows = await statement.fetch(*args)
        return rows

    async def _prepare(self, driver: asyncpg.Connection, sql: str) -> Any:
        """The statement, described once. Without prepared statements it is the unnamed
        one (name ""): with asyncpg's statement cache off (app/db/pooler.py), asyncpg
        parses it again in the very message that runs it (Parse, Bind, Execute, Sync: one
        round trip, on whichever server connection the pooler gives), never relying on a
        statement left on the server; tests/test_pgbouncer.py checks each run carries it."""
        return await driver.prepare(sql, name=None if self._prepared else "")

    async def close(self) -> None:
        """Closes every connection (before the engine is disposed); a call still waiting
        for one is declined."""
        self._closed = True
        while self._pass_on(None):
            pass
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        idle, self._idle = self._idle, []
        for held in self._open - set(idle):
            held.driver.terminate()  # still running a statement no one will wait for
        self._open.clear()
        await asyncio.gather(
            *(held.driver.close(timeout=2) for held in idle), return_exceptions=True
        )

    async def _opened(self) -> _Held:
        self._opening += 1
        try:
            held = _Held(await self._connect())
        finally:
            self._opening -= 1
        self._open.add(held)
        if self._answer_timeout is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watching())
        return held

    def _drop(self, held: _Held) -> None:
        self._open.discard(held)
        held.driver.terminate()
        self._pass_on(None)  # a waiting call may open one in its place

    async def _watching(self) -> None:
        assert self._answer_timeout is not None
        while True:
            await asyncio.sleep(self._answer_timeout / 4)
            late = time.monotonic() - self._answer_timeout
            for held in self._open:
                if 0 < held.busy_since <= late and not held.timed_out:
                    held.timed_out = True
                    held.driver.terminate()  # fails the waiting call at once


def _is_sound(driver: asyncpg.Connection, error: BaseException) -> bool:
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
