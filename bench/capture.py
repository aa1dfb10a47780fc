"""What an engine sends to PostgreSQL: seen through SQLAlchemy events (StatementLog),
and at the driver, asyncpg, where every call that waits for the server is one
round trip (DriverLog). The PostgreSQL fast path runs on asyncpg directly
(app/repositories/postgres/connections.py), so SQLAlchemy's events see only the general
path; the driver sees both.

StatementLog: statements come from `before_cursor_execute`. Transaction control is not a cursor
execute: SQLAlchemy's asyncpg adapter sends BEGIN itself just before the first
statement of a transaction, and COMMIT/ROLLBACK when the connection's `commit` /
`rollback` events fire. Those events also fire on AUTOCOMMIT connections, where
nothing goes over the wire, so each one is counted only when the adapter really
has a transaction open (or is about to open one): the counts match the round trips.
Re-preparing a statement on a connection that has not seen it yet is a further
round trip that these events cannot see; the round-trip section warms its one
connection first so that none happens while counting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from asyncpg import connection, prepared_stmt
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass
class Sent:
    kind: str  # "begin" | "statement" | "commit" | "rollback" | "prepare" (DriverLog)
    connection: int  # id of the DBAPI connection it went over
    at: float
    sql: str = ""
    params: tuple[Any, ...] = ()
    seconds: float = 0.0  # statements only: before → after cursor execute


def _adapter(conn: Any) -> Any:
    return conn.connection.dbapi_connection


def _autocommit(adapter: Any) -> bool:
    return bool(getattr(adapter, "autocommit", False))


def _in_transaction(adapter: Any) -> bool:
    return getattr(adapter, "_transaction", None) is not None


class Recorded:
    """What a log saw, as a list of Sent in the order sent."""

    sent: list[Sent]

    # ---- what was recorded
    @property
    def statements(self) -> int:
        return sum(1 for s in self.sent if s.kind == "statement")

    @property
    def transaction_control(self) -> int:
        return sum(1 for s in self.sent if s.kind in ("begin", "commit", "rollback"))

    @property
    def round_trips(self) -> int:
        """Everything sent: statements, transaction control, and (DriverLog) prepares."""
        return len(self.sent)

    @property
    def longest_statement(self) -> float:
        return max((s.seconds for s in self.sent if s.kind == "statement"), default=0.0)

    @property
    def longest_transaction(self) -> float:
        """BEGIN → COMMIT/ROLLBACK on one connection; an autocommit statement is its own."""
        longest = 0.0
        opened: dict[int, float] = {}
        for s in self.sent:
            if s.kind == "begin":
                opened[s.connection] = s.at
            elif s.kind in ("commit", "rollback") and s.connection in opened:
                longest = max(longest, s.at - opened.pop(s.connection))
        return max(longest, self.longest_statement)

    def units(self) -> list[tuple[bool, list[Sent]]]:
        """The statements grouped as they ran: (in a BEGIN … COMMIT?, statements)."""
        units: list[tuple[bool, list[Sent]]] = []
        open_unit: list[Sent] | None = None
        for s in self.sent:
            if s.kind == "begin":
                open_unit = []
                units.append((True, open_unit))
            elif s.kind == "prepare":
                continue
            elif s.kind == "statement":
                if open_unit is None:
                    units.append((False, [s]))
                else:
                    open_unit.append(s)
            else:
                open_unit = None
        return units


@dataclass
class StatementLog(Recorded):
    """A context manager recording everything sent on `engine` while it is open."""

    engine: AsyncEngine
    sent: list[Sent] = field(default_factory=list)
    _started: dict[int, tuple[float, Sent]] = field(default_factory=dict)

    def __enter__(self) -> StatementLog:
        target = self.engine.sync_engine
        event.listen(target, "before_cursor_execute", self._before)
        event.listen(target, "after_cursor_execute", self._after)
        event.listen(target, "commit", self._commit)
        event.listen(target, "rollback", self._rollback)
        return self

    def __exit__(self, *exc: object) -> None:
        target = self.engine.sync_engine
        event.remove(target, "before_cursor_execute", self._before)
        event.remove(target, "after_cursor_execute", self._after)
        event.remove(target, "commit", self._commit)
        event.remove(target, "rollback", self._rollback)

    def _before(self, conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
        adapter = _adapter(conn)
        now = perf_counter()
        if not _autocommit(adapter) and not _in_transaction(adapter):
            self.sent.append(Sent("begin", id(adapter), now))
        params = tuple(params) if isinstance(params, list | tuple) else (params,)
        sent = Sent("statement", id(adapter), now, sql, params)
        self.sent.append(sent)
        self._started[id(cursor)] = (now, sent)

    def _after(self, conn: Any, cursor: Any, *_: Any) -> None:
        started = self._started.pop(id(cursor), None)
        if started is not None:
            started[1].seconds = perf_counter() - started[0]

    def _end(self, conn: Any, kind: str) -> None:
        adapter = _adapter(conn)
        if not _autocommit(adapter) and _in_transaction(adapter):
            self.sent.append(Sent(kind, id(adapter), perf_counter()))

    def _commit(self, conn: Any) -> None:
        self._end(conn, "commit")

    def _rollback(self, conn: Any) -> None:
        self._end(conn, "rollback")


# Every asyncpg call that sends a message and waits for the answer. Transaction control
# goes through Connection.execute ("BEGIN", "COMMIT", ...), so it is seen there.
_WAITING_CALLS = [
    (connection.Connection, ("prepare", "execute", "executemany", "fetch", "fetchrow", "fetchval")),
    (prepared_stmt.PreparedStatement, ("fetch", "fetchrow", "fetchval", "executemany")),
]
_CONTROL = {"BEGIN": "begin", "COMMIT": "commit", "ROLLBACK": "rollback"}


@dataclass
class DriverLog(Recorded):
    """A context manager recording every round trip asyncpg makes, on any connection of
    the process, while it is open: each is one call that waits for the server."""

    sent: list[Sent] = field(default_factory=list)
    _originals: list[tuple[type, str, Any]] = field(default_factory=list)

    def __enter__(self) -> DriverLog:
        for cls, names in _WAITING_CALLS:
            for name in names:
                original = getattr(cls, name)
                self._originals.append((cls, name, original))
                setattr(cls, name, self._recording(cls, name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in self._originals:
            setattr(cls, name, original)
        self._originals.clear()

    def _recording(self, cls: type, name: str, original: Any) -> Any:
        log = self

        async def recorded(target: Any, *args: Any, **kwargs: Any) -> Any:
            if cls is prepared_stmt.PreparedStatement:
                sql, params, conn = target.get_query(), args, target._connection
            else:
                sql, params, conn = (args[0] if args else ""), args[1:], target
            word = sql.strip().split(" ", 1)[0].rstrip(";").upper()
            kind = "prepare" if name == "prepare" else _CONTROL.get(word, "statement")
            sent = Sent(kind, id(conn), perf_counter(), sql, tuple(params))
            log.sent.append(sent)
            try:
                return await original(target, *args, **kwargs)
            finally:
                sent.seconds = perf_counter() - sent.at

        return recorded
