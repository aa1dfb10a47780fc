"""What changes behind a transaction pooler (PgBouncer, pool_mode = transaction):
DB_PREPARED_STATEMENTS=false, or DB_TRANSACTION_POOLER=true for one that keeps prepared
statements.

Such a pooler gives each transaction whichever server connection is free, so nothing
may outlive a transaction on the server: no session setting, and no named prepared
statement (asyncpg's cache, SQLAlchemy's) unless the pooler itself tracks them, as
PgBouncer does from 1.21 on with `max_prepared_statements` above 0: it prepares a
client's statement on whichever server connection runs it. Whether it does cannot be
asked of it through the client's connection (its version and settings show only on its
admin console), so it is configured, never guessed: DB_TRANSACTION_POOLER=true keeps the
statements prepared, DB_PREPARED_STATEMENTS=false parses each anew. PgBouncer also
refuses startup parameters it does not track, statement_timeout among them
(application_name it tracks, and sets on each server connection it hands out, so that
one stays a startup parameter).

The statement timeout is therefore set with SET LOCAL at the start of every
transaction: it ends with the transaction, so it never reaches another client of the
same server connection as a session SET would, and it is enforced whatever the pooler's
settings. PgBouncer's `ignore_startup_parameters = statement_timeout` would let the
startup parameter through only by dropping it, leaving statements without a timeout.
With the timeout set on the service's role instead and DB_STATEMENT_TIMEOUT_MS=0, no
transaction needs a statement of its own for it, and the credit fast path's statements
run alone (docs/operations.md, "Behind PgBouncer").
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

# asyncpg's own statement cache off: each statement is parsed anew, unnamed, in the same
# round trips as it runs (asyncpg then re-parses within its Bind…Sync, so that even a
# statement outside a transaction stays on one server connection).
DRIVER_ARGS: dict[str, Any] = {"statement_cache_size": 0}


def dialect_args() -> dict[str, Any]:
    """The asyncpg dialect's connect arguments: no statement cache of its own, and the
    statements it still prepares (to learn their columns) unnamed. SQLAlchemy's own
    recipe ("Prepared Statement Name with PGBouncer") names them uniquely instead, but a
    named statement outlives its transaction on a server connection that asyncpg's later
    Close for it rarely reaches, so they pile up there; an unnamed one is replaced by the
    next, and its transaction (SQLAlchemy always opens one) keeps it on one connection."""
    return {"prepared_statement_cache_size": 0, "prepared_statement_name_func": _unnamed}


def _unnamed() -> str:
    return ""  # the protocol's unnamed statement


def local_timeout(statement_timeout_ms: int) -> str | None:
    """The statement setting the timeout for the rest of a transaction; None for none."""
    if not statement_timeout_ms:
        return None
    return f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}"


def time_out_each_transaction(engine: AsyncEngine, statement_timeout_ms: int) -> None:
    """Every transaction the engine begins sets the statement timeout first."""
    statement = local_timeout(statement_timeout_ms)
    if statement is None:
        return

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(statement)
