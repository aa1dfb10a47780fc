"""The SQL store's three repositories over one engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.repositories.base import CreditPolicy, Stores
from app.repositories.pg_credits import PostgresCreditRepository
from app.repositories.sql_base import DEFAULT_BATCH
from app.repositories.sql_cache import SqlCacheRepository
from app.repositories.sql_consents import SqlConsentRepository
from app.repositories.sql_credits import SqlCreditRepository


def sql_stores(
    engine: AsyncEngine, policy: CreditPolicy, *, batch_size: int = DEFAULT_BATCH
) -> Stores:
    """PostgreSQL gets the single-statement fast paths; SQLite keeps the general path."""
    credits_class = (
        PostgresCreditRepository if engine.dialect.name == "postgresql" else SqlCreditRepository
    )
    return Stores(
        credits=credits_class(engine, policy, batch_size=batch_size),
        consents=SqlConsentRepository(engine),
        cache=SqlCacheRepository(engine, batch_size=batch_size),
    )
