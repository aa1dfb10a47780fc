"""Cached answers in SQL (JSONB on PostgreSQL)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.models import QueryCacheRow, table
from app.repositories.sql.base import DEFAULT_BATCH, delete_in_batches, insert, transaction

entries = table(QueryCacheRow)


class SqlCacheRepository:
    """The query cache table on SQLite or PostgreSQL (see CacheRepository)."""

    def __init__(self, engine: AsyncEngine, *, batch_size: int = DEFAULT_BATCH) -> None:
        self._engine = engine
        self._batch_size = batch_size

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        async with transaction(self._engine) as conn:
            result: dict[str, Any] | None = await conn.scalar(
                select(entries.c.result).where(
                    entries.c.query_hash == key, entries.c.expires_at > now
                )
            )
        return result

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        async with transaction(self._engine) as conn:
            statement = insert(conn, entries).values(
                query_hash=key, result=result, cached_at=now, expires_at=expires_at
            )
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[entries.c.query_hash],
                    set_={
                        "result": statement.excluded.result,
                        "cached_at": statement.excluded.cached_at,
                        "expires_at": statement.excluded.expires_at,
                    },
                )
            )

    async def delete_expired(self, *, now: datetime) -> int:
        return await delete_in_batches(
            self._engine,
            entries,
            entries.c.expires_at <= now,
            key=[entries.c.query_hash],
            batch_size=self._batch_size,
        )

    async def clear(self) -> None:
        async with transaction(self._engine) as conn:
            await conn.execute(delete(entries))

    async def count(self, *, now: datetime) -> int:
        async with transaction(self._engine) as conn:
            total = await conn.scalar(
                select(func.count()).select_from(entries).where(entries.c.expires_at > now)
            )
        return int(total or 0)
