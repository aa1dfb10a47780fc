"""Scheduled retention: expired cache entries and ledger rows past the retention period.

On PostgreSQL an advisory lock lets one replica at a time run it; the others skip
that round. The lock is the transaction's, held by a transaction left open for the
round: behind a transaction pooler (PgBouncer) a session's lock would stay on whichever
server connection took it, and the unlock go to another. The deletes themselves go in
bounded batches (repositories).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.services.credits import CreditService
from app.services.query_cache import QueryCacheService

logger = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key of the retention job ("retainer").
RETENTION_LOCK_KEY = 0x72657461696E6572


class RetentionJob:
    """Deletes what retention allows, now (`run_once`) or every `interval` seconds."""

    def __init__(
        self,
        *,
        # The engine to lock on while the database is the active store, else None.
        database: Callable[[], AsyncEngine | None],
        credits: Callable[[], CreditService],
        cache: Callable[[], QueryCacheService],
        retention_days: int,
        interval_seconds: float,
    ) -> None:
        self._database = database
        self._credits = credits
        self._cache = cache
        self._days = retention_days
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> dict[str, Any]:
        """The counts deleted, or `skipped` when another replica holds the lock."""
        async with self._exclusive() as acquired:
            if not acquired:
                return {"transactions_deleted": 0, "cache_entries_deleted": 0, "skipped": True}
            counts = {
                "transactions_deleted": await self._credits().cleanup_old_transactions(self._days),
                "cache_entries_deleted": await self._cache().cleanup_expired(),
                "skipped": False,
            }
        stats = await self._cache().get_stats()
        logger.info("retention: %s; cache: %s", counts, stats)
        return counts

    def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.create_task(self._every_interval(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception:  # the next round tries again; the service keeps serving
                logger.warning("retention round failed", exc_info=True)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[bool]:
        engine = self._database()
        if engine is None or engine.dialect.name != "postgresql":
            yield True
            return
        async with engine.connect() as connection:
            acquired = await connection.scalar(
                text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RETENTION_LOCK_KEY}
            )
            yield bool(acquired)
            # Leaving the block rolls the transaction back, and the lock goes with it.
