"""The QueryCacheService contract, on every store, and its fail-open behaviour."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from app.errors import StorageUnavailableError
from app.services.query_cache import CacheStats, QueryCacheService, cache_key
from tests.support.clock import FakeClock

ANSWER = {"answer": "Found 1 product", "products": [{"id": "sku-1", "price": 9.5}]}


class TestKeys:
    def test_spacing_and_case_do_not_matter(self) -> None:
        assert cache_key("Red  Shoes ") == cache_key("red shoes") == cache_key("\tRED\nshoes")

    def test_context_is_part_of_the_key_in_canonical_form(self) -> None:
        assert cache_key("q", {"a": 1, "b": 2}) == cache_key("q", {"b": 2, "a": 1})
        assert cache_key("q", {"a": 1}) != cache_key("q", {"a": 2})
        assert cache_key("q", None) == cache_key("q", {})

    def test_the_key_is_a_sha256_hex_digest(self) -> None:
        key = cache_key("anything")
        assert len(key) == 64 and int(key, 16) >= 0


class TestReadsAndWrites:
    async def test_a_cached_result_is_returned_for_the_normalised_query(
        self, cache_service: QueryCacheService
    ) -> None:
        await cache_service.cache_result("Red  Shoes ", ANSWER)
        assert await cache_service.get_cached_result("red shoes") == ANSWER

    async def test_a_miss_is_none(self, cache_service: QueryCacheService) -> None:
        assert await cache_service.get_cached_result("never asked") is None

    async def test_context_separates_entries(self, cache_service: QueryCacheService) -> None:
        await cache_service.cache_result("shoes", ANSWER, context={"max_price": 50})
        assert await cache_service.get_cached_result("shoes") is None
        assert await cache_service.get_cached_result("shoes", {"max_price": 50}) == ANSWER

    async def test_writing_again_replaces_the_entry(self, cache_service: QueryCacheService) -> None:
        await cache_service.cache_result("q", ANSWER)
        await cache_service.cache_result("q", {"answer": "newer", "products": []})
        assert await cache_service.get_cached_result("q") == {"answer": "newer", "products": []}

    async def test_unicode_and_nested_json_survive_the_round_trip(
        self, cache_service: QueryCacheService
    ) -> None:
        result: dict[str, Any] = {
            "answer": "Schuhe für 20 € 👟",
            "nested": {"list": [1, 2.5, None, True]},
        }
        await cache_service.cache_result("schuhe", result)
        assert await cache_service.get_cached_result("schuhe") == result


class TestExpiry:
    async def test_an_entry_expires_after_its_ttl(
        self, cache_service: QueryCacheService, clock: FakeClock
    ) -> None:
        await cache_service.cache_result("short", ANSWER, ttl_seconds=60)
        clock.advance(seconds=59)
        assert await cache_service.get_cached_result("short") == ANSWER
        clock.advance(seconds=1)
        assert await cache_service.get_cached_result("short") is None

    async def test_the_default_ttl_applies(
        self, cache_service: QueryCacheService, clock: FakeClock
    ) -> None:
        await cache_service.cache_result("default", ANSWER)
        clock.advance(seconds=3599)
        assert await cache_service.get_cached_result("default") == ANSWER
        clock.advance(seconds=1)
        assert await cache_service.get_cached_result("default") is None

    async def test_cleanup_deletes_only_expired_entries(
        self, cache_service: QueryCacheService, clock: FakeClock
    ) -> None:
        await cache_service.cache_result("old", ANSWER, ttl_seconds=10)
        await cache_service.cache_result("fresh", ANSWER, ttl_seconds=1000)
        clock.advance(seconds=11)
        assert await cache_service.cleanup_expired() == 1
        assert await cache_service.get_cached_result("fresh") == ANSWER
        assert (await cache_service.get_stats())["entries"] == 1

    async def test_clearing_empties_the_cache(self, cache_service: QueryCacheService) -> None:
        await cache_service.cache_result("a", ANSWER)
        await cache_service.cache_result("b", ANSWER)
        await cache_service.clear_cache()
        assert await cache_service.get_cached_result("a") is None
        assert (await cache_service.get_stats())["entries"] == 0


class TestStats:
    async def test_hits_misses_and_entries_are_counted(
        self, cache_service: QueryCacheService
    ) -> None:
        await cache_service.get_cached_result("q")
        await cache_service.cache_result("q", ANSWER)
        await cache_service.get_cached_result("q")
        await cache_service.get_cached_result("Q ")
        stats = await cache_service.get_stats()
        assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 1, 1)
        assert stats["hit_ratio"] == pytest.approx(2 / 3, abs=1e-4)


class TestRefusedResults:
    @pytest.mark.parametrize(
        "result",
        [
            {"answer": float("nan")},
            {"answer": "nul \x00 inside"},
            {"blob": "x" * (256 * 1024 + 1)},
            {"not_json": object()},
        ],
        ids=["nan", "nul", "too-large", "not-json"],
    )
    async def test_a_result_no_store_can_keep_is_refused(
        self, cache_service: QueryCacheService, result: dict[str, Any]
    ) -> None:
        with pytest.raises(ValueError):
            await cache_service.cache_result("bad", result)
        assert await cache_service.get_cached_result("bad") is None

    async def test_a_ttl_below_one_second_is_refused(
        self, cache_service: QueryCacheService
    ) -> None:
        with pytest.raises(ValueError):
            await cache_service.cache_result("q", ANSWER, ttl_seconds=0)


class _BrokenStore:
    """A cache store whose every call fails as a dead database does."""

    async def get(self, key: str, *, now: datetime) -> None:
        raise StorageUnavailableError()

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        raise StorageUnavailableError()

    async def count(self, *, now: datetime) -> int:
        raise StorageUnavailableError()


class TestFailOpen:
    async def test_a_failing_store_reads_as_a_miss_and_drops_writes(self, clock: FakeClock) -> None:
        stats = CacheStats()
        service = QueryCacheService(
            _BrokenStore(), default_ttl_seconds=60, stats=stats, clock=clock
        )  # type: ignore[arg-type]
        await service.cache_result("q", ANSWER)
        assert await service.get_cached_result("q") is None
        summary = await service.get_stats()
        assert (summary["misses"], summary["errors"], summary["entries"]) == (1, 2, None)
