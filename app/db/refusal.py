"""A connection the database, or a pooler in front of it, answered with a refusal.

Such a failure is not "the database is unreachable": something answered, and said why.
Start-up reports it as a refusal, with the SQLSTATE, so that an operator looks at the
configuration rather than the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from app.db.resilience import sqlstate

# Connection exception, authorization, no such database, too many connections, cannot
# connect now: the classes PostgreSQL and PgBouncer answer a connection attempt with.
_REFUSING_CLASSES = ("08", "28", "3D", "53300", "57P03")
# PgBouncer answers a startup parameter it does not track (statement_timeout) with a
# protocol violation, as it does nothing else a correct client sends.
_PROTOCOL_VIOLATION = "08P01"
_POOLER_HINT = (
    "; behind a transaction pooler (PgBouncer, pool_mode = transaction) "
    "set DB_PREPARED_STATEMENTS=false, or DB_TRANSACTION_POOLER=true if it keeps prepared "
    "statements (PgBouncer 1.21 or later, max_prepared_statements above 0)"
)


@dataclass(frozen=True)
class Refusal:
    sqlstate: str
    said: str  # the server's own message: for the log, not for a response body

    @property
    def summary(self) -> str:
        """What failed, without the server's words (which may name a role or database)."""
        hint = _POOLER_HINT if self.sqlstate == _PROTOCOL_VIOLATION else ""
        return f"the database refused the connection (SQLSTATE {self.sqlstate}){hint}"


def connection_refusal(error: BaseException) -> Refusal | None:
    """The refusal behind `error`, as asyncpg raised it or SQLAlchemy wrapped it; None
    when nothing answered or the error is not a refusal to connect."""
    state = sqlstate(error)
    if state is None or not state.startswith(_REFUSING_CLASSES):
        return None
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, asyncpg.PostgresError):
        cause = cause.__cause__ or getattr(cause, "orig", None)
    return Refusal(state, str(getattr(cause, "message", "") or ""))
