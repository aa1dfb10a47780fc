"""The SQL store's three repositories over one engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.repositories.base import CreditPolicy, Stores
from app.repositories.pg_credits import PostgresCreditRepository
from app.repositories.pg_driver import DriverStatements
from app.repositories.sql_base import DEFAULT_BATCH
from app.repositories.sql_cache import SqlCacheRepository
from app.repositories.sql_consents import SqlConsentRepository
from app.repositories.sql_credits import SqlCreditRepository


def sql_stores(
    engine: AsyncEngine,
    policy: CreditPolicy,
    *,
    batch_size: int = DEFAULT_BATCH,
    driver: DriverStatements | None = None,
) -> Stores:
    """PostgreSQL gets the single-statement fast paths, run on `driver` (by default one
    holding no connection between calls, with no client-side bound on a statement);
    SQLite keeps the general path."""
    credits: SqlCreditRepository
    if engine.dialect.name == "postgresql":
        driver = driver or DriverStatements(
            engine, pool_limit=0, recycle_seconds=0, answer_timeout=None
        )
        credits = PostgresCreditRepository(engine, policy, driver, batch_size=batch_size)
    else:
        credits = SqlCreditRepository(engine, policy, batch_size=batch_size)
    return Stores(
        credits=credits,
        consents=SqlConsentRepository(engine),
        cache=SqlCacheRepository(engine, batch_size=batch_size),
    )
