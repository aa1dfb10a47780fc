"""The SQL store's three repositories over one engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain.credits import CreditRules
from app.repositories.base import CreditRepository, Stores
from app.repositories.pg_connections import FastConnections
from app.repositories.pg_credits import PostgresCreditRepository
from app.repositories.sql_base import DEFAULT_BATCH
from app.repositories.sql_cache import SqlCacheRepository
from app.repositories.sql_consents import SqlConsentRepository
from app.repositories.sql_credits import SqlCreditRepository


def sql_stores(
    engine: AsyncEngine,
    rules: CreditRules,
    *,
    batch_size: int = DEFAULT_BATCH,
    fast: FastConnections | None = None,
) -> Stores:
    """With `fast` connections (PostgreSQL), credits take the single-statement fast path
    first; without, and on SQLite, the general path alone."""
    general = SqlCreditRepository(engine, rules, batch_size=batch_size)
    credits: CreditRepository = (
        general if fast is None else PostgresCreditRepository(general, fast, rules)
    )
    return Stores(
        credits=credits,
        consents=SqlConsentRepository(engine),
        cache=SqlCacheRepository(engine, batch_size=batch_size),
    )
