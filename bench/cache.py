"""Section `cache`: QueryCacheService get (hit, miss) and set on every cache backend.

The memory backend is the baseline. Redis is the server at REDIS_URL, else a throwaway
local redis-server (skipped, saying so, when none starts); it goes through the container
like the database backend, so the figures include what a request pays.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from app.container import build_container
from app.domain.credits import CreditRules
from app.repositories.memory import memory_stores
from app.services.query_cache import CacheStats, QueryCacheService
from bench.context import Context
from bench.load import LoadResult, Op, run_load, stateless
from bench.report import LOAD_HEADERS, heading, load_cells, say, table
from bench.server import bench_settings

ENTRIES = 1_000  # cached answers the hits choose from
SET_KEYS = 10_000  # queries the writes choose from: new entries first, then overwrites
# About the size of a real answer: a sentence and five products.
RESULT = {
    "answer": "Here are some running shoes that match what you asked for.",
    "products": [
        {"id": f"sku-{n}", "name": f"Running shoe {n}", "price": 59.9 + n, "in_stock": True}
        for n in range(5)
    ],
}
Operation = Callable[[QueryCacheService, random.Random], Awaitable[object]]


async def _hit(service: QueryCacheService, rng: random.Random) -> None:
    if await service.get_cached_result(f"Bench query {rng.randrange(ENTRIES)}") is None:
        raise LookupError("a cached entry was missed")


async def _miss(service: QueryCacheService, rng: random.Random) -> None:
    if await service.get_cached_result(f"never cached {rng.getrandbits(64)}") is not None:
        raise LookupError("an entry never cached was found")


async def _set(service: QueryCacheService, rng: random.Random) -> None:
    await service.cache_result(f"written {rng.randrange(SET_KEYS)}", RESULT)


OPERATIONS: dict[str, Operation] = {"get (hit)": _hit, "get (miss)": _miss, "set": _set}


@asynccontextmanager
async def _memory(url: str) -> AsyncIterator[tuple[QueryCacheService, CacheStats]]:
    rules = CreditRules(10, 50, timedelta(hours=24))
    stats = CacheStats()
    yield (
        QueryCacheService(memory_stores(rules).cache, default_ttl_seconds=3600, stats=stats),
        stats,
    )


@asynccontextmanager
async def _container(
    url: str, **settings: Any
) -> AsyncIterator[tuple[QueryCacheService, CacheStats]]:
    container = build_container(bench_settings(url, **settings))
    try:
        yield container.cache_service(), container.cache_stats
    finally:
        await container.close()


def _redis() -> tuple[str | None, Callable[[], None]]:
    """REDIS_URL, else a throwaway local redis-server started as the tests start theirs;
    with the function that stops it."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url, lambda: None
    # Imported lazily: only this path needs the test support code (and its server).
    from tests.support.redis import RedisUnavailable, start_local_redis

    try:
        server = start_local_redis()
    except RedisUnavailable as error:
        say(f"  redis: skipped (REDIS_URL is not set and no redis-server starts: {error})")
        return None, lambda: None
    say(f"  redis: a throwaway redis-server at {server.url}")
    return server.url, server.stop


def _backends(redis_url: str | None) -> dict[str, Callable[[str], object]]:
    backends: dict[str, Callable[[str], object]] = {
        "memory": _memory,
        "database": lambda url: _container(url, cache_backend="database"),
    }
    if redis_url is not None:
        backends["redis"] = lambda url: _container(url, cache_backend="redis", redis_url=redis_url)
    return backends


async def _measure(
    ctx: Context, service: QueryCacheService, stats: CacheStats, concurrency: int
) -> dict[str, LoadResult]:
    results = {}
    for name, operation in OPERATIONS.items():

        def make(rng: random.Random, operation: Operation = operation) -> Op:
            return lambda: operation(service, rng)

        errors_before = stats.errors
        result = await run_load(stateless(make), concurrency, ctx.duration, ctx.warmup)
        # The service swallows store failures (a miss, a dropped write); count them here.
        result.errors += stats.errors - errors_before
        if result.errors and not result.first_error:
            result.first_error = "the store failed (the service logged it and carried on)"
        results[name] = result
    return results


async def run(ctx: Context) -> None:
    heading("cache: QueryCacheService (ops/s, latency in ms)")
    url = await ctx.main_db()
    concurrencies = (8,) if ctx.quick else (1, 8)
    results: dict[tuple[str, str, int], LoadResult] = {}
    redis_url, stop_redis = _redis()
    try:
        backends = _backends(redis_url)
        await _measure_backends(ctx, url, backends, concurrencies, results)
    finally:
        stop_redis()
    _report(backends, concurrencies, results)


async def _measure_backends(
    ctx: Context,
    url: str,
    backends: dict[str, Callable[[str], object]],
    concurrencies: tuple[int, ...],
    results: dict[tuple[str, str, int], LoadResult],
) -> None:
    for backend, open_backend in backends.items():
        try:
            async with open_backend(url) as (service, stats):  # type: ignore[attr-defined]
                for number in range(ENTRIES):  # what the hits will find
                    await service.cache_result(f"Bench query {number}", RESULT)
                for concurrency in concurrencies:
                    measured = await _measure(ctx, service, stats, concurrency)
                    for name, result in measured.items():
                        results[(backend, name, concurrency)] = result
                        if result.first_error:
                            say(f"  {backend} {name} c={concurrency}: {result.first_error}")
        except Exception as error:
            say(f"  {backend}: failed: {type(error).__name__}: {error}")


def _report(
    backends: dict[str, Callable[[str], object]],
    concurrencies: tuple[int, ...],
    results: dict[tuple[str, str, int], LoadResult],
) -> None:
    say("  ratio = ops/s over the memory backend for the same operation and concurrency")
    rows = []
    for concurrency in concurrencies:
        for name in OPERATIONS:
            base = results.get(("memory", name, concurrency))
            for backend in backends:
                result = results.get((backend, name, concurrency))
                rows.append([f"{backend} {name}", str(concurrency), *load_cells(result, base)])
    table(["backend and operation", "c", *LOAD_HEADERS], rows)
