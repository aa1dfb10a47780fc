"""The wiring: settings → engine → stores → services. Built in the lifespan, one per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from app.assistant.answerer import Answerer, CatalogueAnswerer
from app.config import Settings, StorageBackend
from app.db import create_engine, masked_url
from app.errors import StorageUnavailableError
from app.health import database_status
from app.migrate import upgrade_to_head
from app.repositories.base import CreditPolicy
from app.repositories.memory import memory_stores
from app.repositories.sql import sql_stores
from app.services.assistant import AssistantService
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import CacheStats, QueryCacheService
from app.storage import StorageProvider

logger = logging.getLogger(__name__)


@dataclass
class Container:
    """Everything a request needs, long-lived; services are cheap views over it."""

    settings: Settings
    engine: AsyncEngine
    storage: StorageProvider
    policy: CreditPolicy
    answerer: Answerer
    cache_stats: CacheStats = field(default_factory=CacheStats)

    def credit_service(self) -> CreditService:
        return CreditService(self.storage.stores.credits, self.policy)

    def consent_service(self) -> UserConsentService:
        return UserConsentService(self.storage.stores.consents)

    def cache_service(self) -> QueryCacheService:
        return QueryCacheService(
            self.storage.cache,
            default_ttl_seconds=self.settings.query_cache_ttl_seconds,
            stats=self.cache_stats,
        )

    def assistant_service(self) -> AssistantService:
        return AssistantService(
            credits=self.credit_service(),
            consents=self.consent_service(),
            cache=self.cache_service(),
            answerer=self.answerer,
            query_cost=self.settings.query_credit_cost,
        )

    async def prepare_database(self) -> None:
        """Migrate (when enabled) and check that the schema is at head."""
        if self.settings.run_migrations_on_startup:
            try:
                await upgrade_to_head(self.engine)
            except Exception as error:
                logger.exception("database migrations failed")
                raise StorageUnavailableError("database migrations failed") from error
        status = await database_status(self.engine)
        if not status["up_to_date"]:
            raise StorageUnavailableError(
                f"database not ready: reachable={status['reachable']}, "
                f"revision={status['revision']}, head={status['head']}"
            )

    async def switch_storage(self, backend: StorageBackend) -> None:
        """Flip the flag; to the database only once it answers at the schema head."""
        if backend is StorageBackend.DATABASE:
            await self.prepare_database()
        self.storage.switch(backend)
        logger.info("storage backend switched to %s", backend.value)

    async def close(self) -> None:
        await self.engine.dispose()


def build_container(settings: Settings, *, answerer: Answerer | None = None) -> Container:
    policy = CreditPolicy(
        guest_max=settings.guest_max_credits,
        registered_max=settings.registered_max_credits,
        reset_period=settings.credit_reset_period,
    )
    engine = create_engine(settings)
    logger.info(
        "storage backend %s, database %s",
        settings.storage_backend.value,
        masked_url(settings.database_url),
    )
    storage = StorageProvider(
        backend=settings.storage_backend,
        cache_backend=settings.cache_backend,
        memory=memory_stores(policy),
        database=sql_stores(engine, policy),
    )
    return Container(
        settings=settings,
        engine=engine,
        storage=storage,
        policy=policy,
        answerer=answerer or CatalogueAnswerer(),
    )
