"""The assistant on the Redis cache tier: replicas share answers; a dead Redis is a miss."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from tests.conftest import app_settings
from tests.support.app_client import running
from tests.support.redis import RedisServer

QUERY = "/api/v1/assistant/query"
ADMIN = {"Authorization": "Bearer test-admin-token"}


@asynccontextmanager
async def replica(
    database_url: str, redis_url: str, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = app_settings(
        "database", database_url, cache_backend="redis", redis_url=redis_url, **overrides
    )
    async with running(settings) as (_, client):
        yield client


async def ask(
    client: httpx.AsyncClient, user: str, query: str, *, is_guest: bool = True
) -> dict[str, Any]:
    await client.put(f"/api/v1/consents/{user}", json={"terms_accepted": True})
    body = {"user_id": user, "query": query, "is_guest": is_guest}
    response = await client.post(QUERY, json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


class TestReplicasShareAnswers:
    async def test_an_answer_cached_by_one_replica_is_a_free_hit_on_another(
        self, database_url: str, redis_server: RedisServer
    ) -> None:
        namespace = f"test:{uuid.uuid4().hex[:12]}"
        async with (
            replica(database_url, redis_server.url, redis_namespace=namespace) as first,
            replica(database_url, redis_server.url, redis_namespace=namespace) as second,
        ):
            answered = await ask(first, "ann", "waterproof hiking boots")
            shared = await ask(second, "bob", "Waterproof  hiking BOOTS")
            assert (answered["cached"], shared["cached"]) == (False, True)
            assert shared["products"] == answered["products"]
            assert shared["credits"]["available_credits"] == 10  # bob paid nothing
            stats = (await second.get("/admin/cache/stats", headers=ADMIN)).json()
            assert stats["backend"] == "redis" and stats["redis_breaker"] == "closed"
            assert stats["local_tier"]["hits_shared"] == 1  # bob's answer came from Redis
            assert stats["local_tier"]["entries"] == 1

    async def test_a_copy_read_from_redis_expires_with_its_entry_not_later(
        self, database_url: str, redis_server: RedisServer
    ) -> None:
        settings = {
            "redis_namespace": f"test:{uuid.uuid4().hex[:12]}",
            "query_cache_ttl_seconds": 1,
        }
        async with (
            replica(database_url, redis_server.url, **settings) as first,
            replica(database_url, redis_server.url, **settings) as second,
        ):
            await ask(first, "ann", "waterproof hiking boots")
            assert (await ask(second, "bob", "waterproof hiking boots"))["cached"] is True
            await asyncio.sleep(1.2)  # the entry has expired; the local copies must not outlive it
            assert (await ask(second, "cyd", "waterproof hiking boots"))["cached"] is False

    async def test_clearing_on_one_replica_clears_for_the_other(
        self, database_url: str, redis_server: RedisServer
    ) -> None:
        namespace = f"test:{uuid.uuid4().hex[:12]}"
        fresh = {"redis_namespace": namespace, "cache_local_max_entries": 0}
        async with (
            replica(database_url, redis_server.url, **fresh) as first,
            replica(database_url, redis_server.url, **fresh) as second,
        ):
            await ask(first, "cara", "espresso machine")
            assert (await first.delete("/admin/cache", headers=ADMIN)).status_code == 200
            deadline = time.monotonic() + 3  # the generation is re-read every second
            while (await ask(second, "dan", "espresso machine"))["cached"]:
                assert time.monotonic() < deadline
                await second.delete("/admin/cache", headers=ADMIN)


class TestRedisDown:
    async def test_the_assistant_keeps_answering_promptly_while_redis_is_down(
        self, database_url: str, redis_outage_server: RedisServer
    ) -> None:
        settings = {
            "redis_timeout_seconds": 0.25,
            "cache_breaker_reset_seconds": 0.5,
            "cache_local_max_entries": 0,  # every read and write goes to Redis
        }
        async with replica(database_url, redis_outage_server.url, **settings) as client:
            baseline = time.monotonic()
            await ask(client, "eve", "camping stove", is_guest=False)
            normal = time.monotonic() - baseline

            redis_outage_server.pause()
            try:
                slowest = 0.0
                for n in range(6):
                    began = time.monotonic()
                    body = await ask(client, "eve", f"tent for {n} people", is_guest=False)
                    slowest = max(slowest, time.monotonic() - began)
                    assert body["cached"] is False
                stats = (await client.get("/admin/cache/stats", headers=ADMIN)).json()
            finally:
                redis_outage_server.resume()
            assert slowest < normal + 1.0
            assert stats["redis_breaker"] == "open" and stats["errors"] >= 3

            deadline = time.monotonic() + 5  # the breaker lets a probe through after 0.5 s
            while not (await ask(client, "eve", "camping stove", is_guest=False))["cached"]:
                assert time.monotonic() < deadline, "the cache did not come back"
                await asyncio.sleep(0.1)
