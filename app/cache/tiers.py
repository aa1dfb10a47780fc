"""The query cache's stores: memory, the database or Redis, and the local tier in front.

The shared stores (database, Redis) get the bounded in-process LRU in front when
CACHE_LOCAL_MAX_ENTRIES > 0. Redis sits behind a circuit breaker of its own, so a
dead Redis costs one short timeout per request only until the breaker opens; after
that, reads are misses at once (QueryCacheService fails open).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.cache.local_tier import LocalCacheTier, TierStats
from app.cache.redis_tier import RedisCacheRepository, redis_client
from app.config import CacheBackend, Settings
from app.db.guarded import GuardedEntryCache
from app.db.resilience import CircuitBreaker, Guard, RetryPolicy
from app.repositories.base import CacheRepository

# The cache is never worth waiting for: one attempt, then a miss.
ONE_ATTEMPT = RetryPolicy(attempts=1, max_seconds=0, initial_backoff=0, max_backoff=0)


def is_redis_fault(error: BaseException) -> bool:
    """Redis cannot serve now: refused, reset, timed out."""
    return isinstance(
        error, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError | TimeoutError
    )


@dataclass
class CacheTiers:
    caches: dict[CacheBackend, CacheRepository]
    local_stats: TierStats | None = None
    local_tiers: list[LocalCacheTier] = field(default_factory=list)
    redis: Redis | None = None
    redis_breaker: CircuitBreaker | None = None

    def local_snapshot(self) -> dict[str, float] | None:
        """The local tier's counters and size, for the stats route and the logs."""
        if self.local_stats is None:
            return None
        entries = sum(len(tier) for tier in self.local_tiers)
        return {**self.local_stats.snapshot(), "entries": entries}

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


def build_cache_tiers(
    settings: Settings, *, memory: CacheRepository, database: CacheRepository
) -> CacheTiers:
    local_stats = TierStats() if settings.cache_local_max_entries else None

    def tiered(shared: CacheRepository) -> CacheRepository:
        if local_stats is None:
            return shared
        tier = LocalCacheTier(
            shared,
            max_entries=settings.cache_local_max_entries,
            local_ttl_seconds=settings.cache_local_ttl_seconds,
            stats=local_stats,
        )
        tiers.local_tiers.append(tier)
        return tier

    tiers = CacheTiers(caches={CacheBackend.MEMORY: memory}, local_stats=local_stats)
    tiers.caches[CacheBackend.DATABASE] = tiered(database)
    if settings.cache_backend is CacheBackend.REDIS:
        tiers.redis = redis_client(settings.redis_url, timeout=settings.redis_timeout_seconds)
        tiers.redis_breaker = CircuitBreaker(
            failure_threshold=settings.cache_breaker_failure_threshold,
            reset_timeout=settings.cache_breaker_reset_seconds,
        )
        guard = Guard(
            tiers.redis_breaker, ONE_ATTEMPT, transient=is_redis_fault, unavailable=is_redis_fault
        )
        redis_store = RedisCacheRepository(tiers.redis, settings.redis_namespace)
        tiers.caches[CacheBackend.REDIS] = tiered(GuardedEntryCache(redis_store, guard))
    return tiers
