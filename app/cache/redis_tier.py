"""Cached answers in Redis: versioned JSON documents that Redis expires by itself.

Layout, all under one namespace so the cache can share a Redis with other data:

- ``{ns}:generation`` — an integer, bumped by ``clear()``; it never expires.
- ``{ns}:g{generation}:{key}`` — one entry, ``{"v": 1, "result": …, "cached_at": …,
  "expires_at": …}``, written with ``SET … PX <ms until expires_at>``.

``clear()`` moves every instance to a new generation instead of deleting keys: no
FLUSHDB (other data may live in the same database) and no KEYS (it blocks the server
for the whole keyspace). Entries of old generations are unreachable and leave by TTL.

Run Redis with a ``volatile-*`` eviction policy (or none): every entry key has a TTL
and the generation key has none, so memory pressure evicts entries, never the
generation. Under ``allkeys-*`` the generation could be evicted, fall back to 0 and
bring back still-live entries of generation 0.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_NAMESPACE = "shopasst:cache"
GENERATION_REFRESH_SECONDS = 1.0
COUNT_LIMIT = 100_000
_SCAN_BATCH = 1000
_MILLISECOND = timedelta(milliseconds=1)
_GLOB_SPECIAL = frozenset("\\*?[]")


def redis_client(
    url: str, *, timeout: float, health_check_interval: int = 30, max_connections: int = 64
) -> Redis:
    """A client on its own connection pool, closed by ``await client.aclose()``.

    ``timeout`` bounds both connecting and every reply, so a hung server costs a
    request at most that long. No retries: the cache is never critical, and the
    caller (QueryCacheService) turns a failure into a miss at once rather than
    multiplying the wait. ``health_check_interval`` PINGs a connection idle that
    long before reuse, so one left broken by a Redis restart is replaced unseen.
    """
    pool = ConnectionPool.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=health_check_interval,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + char if char in _GLOB_SPECIAL else char for char in text)


def _encode(result: dict[str, Any], now: datetime, expires_at: datetime) -> bytes:
    document = {
        "v": FORMAT_VERSION,
        "result": result,
        "cached_at": now.isoformat(),
        "expires_at": expires_at.isoformat(),
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _decode(raw: bytes | str) -> tuple[dict[str, Any], datetime] | None:
    """The result and its expiry, or None for anything this version did not write."""
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("v") != FORMAT_VERSION:
            return None
        result, expires_at = document["result"], datetime.fromisoformat(document["expires_at"])
    except (ValueError, TypeError, KeyError):  # bad JSON or UTF-8, missing or odd fields
        return None
    if not isinstance(result, dict):
        return None
    return result, expires_at


class RedisCacheRepository:
    """The query cache in Redis (see CacheRepository).

    Every Redis error (``redis.exceptions.ConnectionError``, ``TimeoutError``, …)
    propagates unchanged; QueryCacheService makes it a miss or a dropped write.

    The generation is re-read from Redis at most every ``generation_refresh_seconds``
    (monotonic clock). Bound: after another instance's ``clear()``, this instance may
    still serve entries written before the clear for at most that long (default 1 s;
    0 re-reads it on every call). Its own ``clear()`` takes effect at once. Writes it
    makes in that window land in the old generation and are lost, which a cache can
    afford.
    """

    def __init__(
        self,
        client: Redis,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        generation_refresh_seconds: float = GENERATION_REFRESH_SECONDS,
        count_limit: int = COUNT_LIMIT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not namespace:
            raise ValueError("namespace must not be empty")
        self._client = client
        self._namespace = namespace
        self._generation_key = f"{namespace}:generation"
        self._refresh = generation_refresh_seconds
        self._count_limit = count_limit
        self._monotonic = monotonic
        self._generation: tuple[int, float] | None = None  # (generation, read at)
        self._clears = 0  # lets a read racing our own clear() see it lost

    @property
    def namespace(self) -> str:
        return self._namespace

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        entry = await self.get_entry(key, now=now)
        return None if entry is None else entry[0]

    async def get_entry(self, key: str, *, now: datetime) -> tuple[dict[str, Any], datetime] | None:
        """The result with its expiry (LocalCacheTier bounds its copy by it), or None.

        The stored ``expires_at`` is checked against ``now`` as well as Redis's TTL:
        the caller's clock decides, as on every other store, even when it runs ahead
        of Redis's (skew, or the delay between computing ``now`` and the SET).
        """
        raw = await self._client.get(await self._entry_key(key))
        if raw is None:
            return None
        entry = _decode(raw)
        if entry is None:
            logger.debug(
                "cache entry %s is not a v%d document; read as a miss", key, FORMAT_VERSION
            )
            return None
        return entry if entry[1] > now else None

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        """Upsert with ``PX`` = the time left until ``expires_at``, rounded up to a whole
        millisecond. An entry already expired is not written, and the key is deleted:
        as an upsert, it must hide any older value, as the other stores do."""
        name = await self._entry_key(key)
        ttl_ms = -((now - expires_at) // _MILLISECOND)  # ceil((expires_at - now) / 1 ms)
        if ttl_ms <= 0:
            await self._client.unlink(name)
            return
        await self._client.set(name, _encode(result, now, expires_at), px=ttl_ms)

    async def delete_expired(self, *, now: datetime) -> int:
        """Always 0: Redis removes an entry itself when its TTL runs out."""
        return 0

    async def clear(self) -> None:
        """Bump the generation: every entry becomes unreachable, for this instance at
        once and for others within their refresh interval. Keys outside the
        namespace, and other namespaces, are untouched."""
        generation = await self._client.incr(self._generation_key)
        self._clears += 1
        self._generation = (generation, self._monotonic())

    async def count(self, *, now: datetime) -> int:
        """Keys of the current generation that Redis still holds, found by SCAN in
        batches of 1000 (never KEYS, which blocks the server).

        Expiry here is Redis's own clock, not ``now``. Bounded: the scan stops at
        ``count_limit`` keys (default 100 000) and reports that number, meaning
        "at least"; counting costs memory and round trips linear in the keys seen.
        """
        pattern = _glob_escape(f"{self._namespace}:g{await self._current_generation()}:") + "*"
        seen: set[bytes | str] = set()  # SCAN may return a key twice during a rehash
        cursor = 0
        while True:
            cursor, keys = await self._client.scan(cursor, match=pattern, count=_SCAN_BATCH)
            seen.update(keys)
            if cursor == 0 or len(seen) >= self._count_limit:
                return min(len(seen), self._count_limit)

    async def _entry_key(self, key: str) -> str:
        return f"{self._namespace}:g{await self._current_generation()}:{key}"

    async def _current_generation(self) -> int:
        cached = self._generation
        if cached is not None and self._monotonic() - cached[1] < self._refresh:
            return cached[0]
        clears = self._clears
        raw = await self._client.get(self._generation_key)
        if clears != self._clears and self._generation is not None:
            return self._generation[0]  # our clear() finished meanwhile: its value is newer
        generation = 0 if raw is None else int(raw)
        self._generation = (generation, self._monotonic())
        return generation
