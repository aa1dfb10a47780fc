"""The SQL store's three repositories over one engine."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain.credits import CreditRules
from app.domain.privacy import Pseudonyms
from app.repositories.base import StateRepository, Stores
from app.repositories.postgres.connections import FastConnections
from app.repositories.postgres.consents import PostgresConsentRepository
from app.repositories.postgres.credits import PostgresCreditRepository
from app.repositories.postgres.state import PostgresStateRepository
from app.repositories.sql.base import DEFAULT_BATCH
from app.repositories.sql.cache import SqlCacheRepository
from app.repositories.sql.consents import SqlConsentRepository
from app.repositories.sql.credits import SqlCreditRepository
from app.repositories.sql.state import SqlStateRepository


def sql_stores(
    engine: AsyncEngine,
    rules: CreditRules,
    *,
    batch_size: int = DEFAULT_BATCH,
    fast: FastConnections | None = None,
    pseudonyms: Pseudonyms | None = None,
) -> Stores:
    """With `fast` connections (PostgreSQL), credit operations and consent reads take the
    single-statement fast path first; without, and on SQLite, the general path alone.
    `pseudonyms`: erasure is configured, and an erased id resumes its account."""
    general = SqlCreditRepository(engine, rules, batch_size=batch_size, pseudonyms=pseudonyms)
    consents = SqlConsentRepository(engine)
    if fast is None:
        return Stores(general, consents, SqlCacheRepository(engine, batch_size=batch_size))
    return Stores(
        credits=PostgresCreditRepository(general, fast, rules, pseudonyms),
        consents=PostgresConsentRepository(consents, fast, rules),
        cache=SqlCacheRepository(engine, batch_size=batch_size),
    )


def state_repository(
    engine: AsyncEngine,
    rules: CreditRules,
    *,
    retention: timedelta,
    pseudonyms: Pseudonyms | None = None,
    transaction_setting: str | None = None,
) -> StateRepository:
    """The database's users as a whole: on asyncpg for PostgreSQL (its imports and
    hand-overs move millions of rows), through SQLAlchemy on SQLite.
    `transaction_setting`: app/db/engine.py's, for PostgreSQL's own transactions."""
    if engine.dialect.name == "postgresql":
        return PostgresStateRepository(
            engine,
            rules,
            retention=retention,
            pseudonyms=pseudonyms,
            transaction_setting=transaction_setting,
        )
    return SqlStateRepository(engine, rules, retention=retention, pseudonyms=pseudonyms)
