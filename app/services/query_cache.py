"""The query cache: answers keyed by the normalised query and its context."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from app.clock import Clock, utc_now
from app.errors import InvalidInputError
from app.json_documents import MAX_RESULT_BYTES, canonical_json, storable_json
from app.repositories.base import CacheRepository

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Counters for one process, kept across requests and storage toggles."""

    hits: int = 0
    misses: int = 0
    errors: int = 0


def normalise_query(query: str) -> str:
    """Trimmed, case-folded, inner whitespace collapsed: "Red  Shoes " == "red shoes"."""
    return " ".join(query.split()).casefold()


def cache_key(query: str, context: dict[str, Any] | None = None) -> str:
    material = normalise_query(query) + "\x00" + canonical_json(context or {})
    return hashlib.sha256(material.encode()).hexdigest()


class QueryCacheService:
    """Answers to normalised queries, with a TTL (SPEC §3).

    Never critical: when the store fails, a read is a miss and a write is
    dropped, each logged and counted in `errors`.
    """

    def __init__(
        self,
        repository: CacheRepository,
        *,
        default_ttl_seconds: int,
        stats: CacheStats,
        clock: Clock = utc_now,
    ) -> None:
        self._repository = repository
        self._default_ttl = default_ttl_seconds
        self._stats = stats
        self._clock = clock

    async def get_cached_result(
        self, query: str, context: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        return await self.get_by_key(cache_key(query, context))

    async def get_by_key(self, key: str) -> dict[str, Any] | None:
        """As get_cached_result, for a caller that has the key already (`cache_key`)."""
        try:
            result = await self._repository.get(key, now=self._clock())
        except Exception:
            self._stats.errors += 1
            logger.warning("query cache read failed; treated as a miss", exc_info=True)
            result = None
        if result is None:
            self._stats.misses += 1
        else:
            self._stats.hits += 1
        return result

    async def cache_result(
        self,
        query: str,
        result: dict[str, Any],
        context: dict[str, Any] | None = None,
        ttl_seconds: int | None = None,
    ) -> None:
        """Upserts the entry. InvalidInputError for a result no store can keep (not JSON,
        NUL characters, over 256 KiB) or a TTL below one second."""
        ttl = self._default_ttl if ttl_seconds is None else ttl_seconds
        if ttl < 1:
            raise InvalidInputError(f"ttl_seconds must be at least 1, got {ttl}")
        if not isinstance(result, dict):
            raise InvalidInputError("a cached result must be a JSON object")
        storable_json(result, max_bytes=MAX_RESULT_BYTES)
        now = self._clock()
        try:
            await self._repository.set(
                cache_key(query, context), result, now=now, expires_at=now + timedelta(seconds=ttl)
            )
        except Exception:
            self._stats.errors += 1
            logger.warning("query cache write failed; entry dropped", exc_info=True)

    async def cleanup_expired(self) -> int:
        return await self._repository.delete_expired(now=self._clock())

    async def clear_cache(self) -> None:
        await self._repository.clear()

    async def get_stats(self) -> dict[str, Any]:
        try:
            entries: int | None = await self._repository.count(now=self._clock())
        except Exception:
            logger.warning("query cache size unavailable", exc_info=True)
            entries = None
        lookups = self._stats.hits + self._stats.misses
        return {
            "hits": self._stats.hits,
            "misses": self._stats.misses,
            "errors": self._stats.errors,
            "entries": entries,
            "hit_ratio": round(self._stats.hits / lookups, 4) if lookups else 0.0,
        }
