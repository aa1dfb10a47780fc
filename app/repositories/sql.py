"""The SQL store's three repositories over one engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.repositories.base import CreditPolicy, Stores
from app.repositories.pg_credits import PostgresCreditRepository
from app.repositories.sql_cache import SqlCacheRepository
from app.repositories.sql_consents import SqlConsentRepository
from app.repositories.sql_credits import SqlCreditRepository


def sql_stores(engine: AsyncEngine, policy: CreditPolicy) -> Stores:
    return Stores(
        credits=(
            PostgresCreditRepository(engine, policy)
            if engine.dialect.name == "postgresql"
            else SqlCreditRepository(engine, policy)
        ),
        consents=SqlConsentRepository(engine),
        cache=SqlCacheRepository(engine),
    )
