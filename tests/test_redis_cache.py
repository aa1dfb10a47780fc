"""RedisCacheRepository against a real redis-server: format, TTL, namespaces, clear, outages.

The server comes from tests/support/redis.py (REDIS_TEST_URL or a throwaway local
redis-server). Without one these tests skip, or fail under CI=true / REQUIRE_REDIS=1.
Each test works in a namespace of its own and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.cache.local_tier import LocalCacheTier
from app.cache.redis_tier import RedisCacheRepository, redis_client
from app.services.query_cache import CacheStats, QueryCacheService
from tests.support.redis import RedisServer

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
ANSWER: dict[str, Any] = {
    "answer": "Schuhe für 20 € 👟 — 日本語",
    "products": [{"id": "sku-1", "price": 9.5, "tags": ["a", None, True]}],
    "nested": {"deeper": {"empty": {}, "list": [[1, 2], []]}},
}
OUTAGE_TIMEOUT = 0.2  # the client's socket timeouts in the outage tests
PROMPT = 1.0  # a failed call must not take longer than this


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url, timeout=2.0)
    yield client
    await client.aclose()


@pytest.fixture
async def namespace(client: Redis) -> AsyncIterator[str]:
    """A namespace of this test's own, deleted afterwards (servers may be shared)."""
    name = f"test:{uuid.uuid4().hex[:12]}"
    yield name
    keys = [key async for key in client.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await client.unlink(*keys)


@pytest.fixture
def repo(client: Redis, namespace: str) -> RedisCacheRepository:
    return RedisCacheRepository(client, namespace)


async def entry_keys(client: Redis, namespace: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"{namespace}:g[0-9]*")]


class TestDocuments:
    async def test_nested_unicode_json_survives_the_round_trip(
        self, repo: RedisCacheRepository
    ) -> None:
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await repo.get("k", now=T0) == ANSWER

    async def test_the_stored_value_is_a_versioned_json_document(
        self, repo: RedisCacheRepository, client: Redis, namespace: str
    ) -> None:
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await entry_keys(client, namespace) == [f"{namespace}:g0:k".encode()]
        raw = await client.get(f"{namespace}:g0:k")
        assert isinstance(raw, bytes) and raw.startswith(
            b'{"v":1,"result":{"answer":"Schuhe f\xc3\xbcr'
        )

    @pytest.mark.parametrize(
        "raw",
        [
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'{"v": 2, "result": {"a": 1}, "expires_at": "2999-01-01T00:00:00+00:00"}',
            b'{"result": {"a": 1}, "expires_at": "2999-01-01T00:00:00+00:00"}',
            b'{"v": 1, "result": [1], "expires_at": "2999-01-01T00:00:00+00:00"}',
            b'{"v": 1, "result": {"a": 1}}',
            b'{"v": 1, "result": {"a": 1}, "expires_at": "tomorrow"}',
        ],
        ids=["text", "bad-utf8", "list", "v2", "no-version", "not-object", "no-expiry", "bad-date"],
    )
    async def test_a_value_this_version_did_not_write_reads_as_none(
        self, repo: RedisCacheRepository, client: Redis, namespace: str, raw: bytes
    ) -> None:
        await client.set(f"{namespace}:g0:k", raw, ex=60)
        assert await repo.get("k", now=T0) is None


class TestExpiry:
    async def test_redis_expires_the_entry_by_its_ttl(
        self, repo: RedisCacheRepository, client: Redis, namespace: str
    ) -> None:
        now = datetime.now(UTC)
        await repo.set("k", ANSWER, now=now, expires_at=now + timedelta(milliseconds=300))
        assert 0 < await client.pttl(f"{namespace}:g0:k") <= 300
        assert await repo.get("k", now=datetime.now(UTC)) == ANSWER
        await asyncio.sleep(0.35)
        assert await client.exists(f"{namespace}:g0:k") == 0  # gone from Redis itself
        assert await repo.get("k", now=datetime.now(UTC)) is None

    async def test_the_callers_clock_decides_too(self, repo: RedisCacheRepository) -> None:
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await repo.get("k", now=T0 + HOUR - timedelta(microseconds=1)) == ANSWER
        assert await repo.get("k", now=T0 + HOUR) is None  # still in Redis, but expired

    async def test_an_already_expired_write_stores_nothing_and_hides_the_old_value(
        self, repo: RedisCacheRepository, client: Redis, namespace: str
    ) -> None:
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        await repo.set("k", {"newer": True}, now=T0, expires_at=T0)
        assert await entry_keys(client, namespace) == []
        assert await repo.get("k", now=T0) is None

    async def test_delete_expired_leaves_it_to_redis(self, repo: RedisCacheRepository) -> None:
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await repo.delete_expired(now=T0 + 2 * HOUR) == 0


class TestSharingAndClearing:
    async def test_two_instances_on_two_clients_share_entries(
        self, redis_server: RedisServer, repo: RedisCacheRepository, namespace: str
    ) -> None:
        other_client = redis_client(redis_server.url, timeout=2.0)
        try:
            other = RedisCacheRepository(other_client, namespace)
            await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
            assert await other.get("k", now=T0) == ANSWER
            await other.set("k", {"by": "other"}, now=T0, expires_at=T0 + HOUR)
            assert await repo.get("k", now=T0) == {"by": "other"}
        finally:
            await other_client.aclose()

    async def test_clear_touches_nothing_outside_the_namespace(
        self, repo: RedisCacheRepository, client: Redis, namespace: str
    ) -> None:
        foreign = f"other:key:{uuid.uuid4().hex[:8]}"
        await client.set(foreign, 1)
        try:
            await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
            await repo.clear()
            assert await repo.get("k", now=T0) is None
            assert await client.get(foreign) == b"1"
            # The old generation's keys stay until their TTL; nothing lingers without one.
            assert [await client.pttl(key) > 0 for key in await entry_keys(client, namespace)] == [
                True
            ]
            await repo.set("k", {"after": "clear"}, now=T0, expires_at=T0 + HOUR)
            assert await repo.get("k", now=T0) == {"after": "clear"}
        finally:
            await client.delete(foreign)

    async def test_another_instance_stops_serving_cleared_entries_within_its_bound(
        self, client: Redis, repo: RedisCacheRepository, namespace: str
    ) -> None:
        ticks = [100.0]  # the lagging instance's monotonic clock, moved by hand
        lagging = RedisCacheRepository(client, namespace, monotonic=lambda: ticks[0])
        eager = RedisCacheRepository(client, namespace, generation_refresh_seconds=0)
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await lagging.get("k", now=T0) == ANSWER  # generation read and cached
        await repo.clear()
        assert await repo.get("k", now=T0) is None
        assert await eager.get("k", now=T0) is None
        ticks[0] += 0.9
        assert await lagging.get("k", now=T0) == ANSWER  # stale, within the 1 s bound
        ticks[0] += 0.1
        assert await lagging.get("k", now=T0) is None

    async def test_namespaces_isolate_repositories(
        self, client: Redis, repo: RedisCacheRepository, namespace: str
    ) -> None:
        other = RedisCacheRepository(client, f"{namespace}:neighbour*[x]")
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await other.get("k", now=T0) is None
        await other.set("k", {"n": 2}, now=T0, expires_at=T0 + HOUR)
        await other.clear()
        assert await repo.get("k", now=T0) == ANSWER
        assert await repo.count(now=T0) == 1  # glob characters in a namespace are literal

    async def test_count_sees_the_current_generation_only(
        self, client: Redis, repo: RedisCacheRepository, namespace: str
    ) -> None:
        for index in range(5):
            await repo.set(f"k{index}", ANSWER, now=T0, expires_at=T0 + HOUR)
        await repo.set("expired", ANSWER, now=T0, expires_at=T0)
        assert await repo.count(now=T0) == 5
        assert await RedisCacheRepository(client, namespace, count_limit=3).count(now=T0) == 3
        await repo.clear()
        assert await repo.count(now=T0) == 0


# --- outages -------------------------------------------------------------------------


@pytest.fixture
async def outage_client(redis_outage_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_outage_server.url, timeout=OUTAGE_TIMEOUT)
    yield client
    await client.aclose()


async def fails_promptly(call: Awaitable[object]) -> type[BaseException]:
    started = time.monotonic()
    with pytest.raises(redis_errors.RedisError) as caught:
        await call
    assert time.monotonic() - started < PROMPT
    return caught.type


class TestOutages:
    async def test_a_stopped_server_fails_calls_at_once_and_a_restart_heals(
        self, redis_outage_server: RedisServer, outage_client: Redis
    ) -> None:
        repo = RedisCacheRepository(outage_client, "outage")
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        redis_outage_server.pause()
        try:
            assert await fails_promptly(repo.get("k", now=T0)) is redis_errors.ConnectionError
            error = await fails_promptly(repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR))
            assert error is redis_errors.ConnectionError
        finally:
            redis_outage_server.resume()
        assert await repo.get("k", now=T0) is None  # no persistence: a restart is empty
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        assert await repo.get("k", now=T0) == ANSWER

    async def test_a_hung_server_fails_calls_by_the_timeout(
        self, redis_outage_server: RedisServer, outage_client: Redis
    ) -> None:
        repo = RedisCacheRepository(outage_client, "hung", generation_refresh_seconds=0)
        await repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR)
        redis_outage_server.freeze()
        try:
            assert await fails_promptly(repo.get("k", now=T0)) is redis_errors.TimeoutError
            error = await fails_promptly(repo.set("k", ANSWER, now=T0, expires_at=T0 + HOUR))
            assert error is redis_errors.TimeoutError
        finally:
            redis_outage_server.thaw()
        assert await repo.get("k", now=T0) == ANSWER

    async def test_the_service_reads_misses_and_drops_writes_while_redis_is_down(
        self, redis_outage_server: RedisServer, outage_client: Redis
    ) -> None:
        stats = CacheStats()
        service = QueryCacheService(
            RedisCacheRepository(outage_client, "service"), default_ttl_seconds=60, stats=stats
        )
        await service.cache_result("red shoes", ANSWER)
        redis_outage_server.pause()
        try:
            started = time.monotonic()
            await service.cache_result("blue shoes", ANSWER)
            assert await service.get_cached_result("red shoes") is None
            assert (await service.get_stats())["entries"] is None
            assert time.monotonic() - started < 3 * PROMPT
        finally:
            redis_outage_server.resume()
        assert (stats.hits, stats.misses, stats.errors) == (0, 1, 2)
        await service.cache_result("red shoes", ANSWER)
        assert await service.get_cached_result("Red  Shoes") == ANSWER

    async def test_a_local_tier_keeps_answering_from_memory_while_redis_is_down(
        self, redis_outage_server: RedisServer, outage_client: Redis
    ) -> None:
        shared = RedisCacheRepository(outage_client, "tiered")
        tier = LocalCacheTier(shared, local_ttl_seconds=30)
        await shared.set("k", ANSWER, now=T0, expires_at=T0 + timedelta(seconds=10))
        assert await tier.get("k", now=T0) == ANSWER  # from Redis, with its expiry
        redis_outage_server.pause()
        try:
            assert await tier.get("k", now=T0 + timedelta(seconds=9)) == ANSWER
            with pytest.raises(redis_errors.ConnectionError):  # the copy expired with Redis's
                await tier.get("k", now=T0 + timedelta(seconds=10))
        finally:
            redis_outage_server.resume()
        assert tier.stats.snapshot() == {
            "hits_local": 1,
            "hits_shared": 1,
            "misses": 0,
            "shared_errors": 1,
            "local_hit_ratio": 0.5,
            "shared_hit_ratio": 0.5,
        }
