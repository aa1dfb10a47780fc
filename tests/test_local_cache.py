"""LocalCacheTier: the LRU bound, expiry, the local cap, shared-tier failures, stats.

The shared tier is MemoryCacheRepository, wrapped where a test needs it to fail,
stall or report expiries. Time is passed explicitly (no sleeps).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.cache.local_tier import LocalCacheTier, TierStats
from app.repositories.memory import MemoryCacheRepository

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def answer(name: str) -> dict[str, Any]:
    return {"answer": name, "products": [{"id": name, "tags": ["x"]}]}


class Flaky(MemoryCacheRepository):
    """A shared tier that fails every call while `down`, as Redis in an outage."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.reads = 0

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("shared tier down")

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        self._check()
        self.reads += 1
        return await super().get(key, now=now)

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        self._check()
        await super().set(key, result, now=now, expires_at=expires_at)

    async def clear(self) -> None:
        self._check()
        await super().clear()


class KnowsExpiry(Flaky):
    """A shared tier with `get_entry`, as RedisCacheRepository has."""

    def __init__(self) -> None:
        super().__init__()
        self.expiries: dict[str, datetime] = {}

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        await super().set(key, result, now=now, expires_at=expires_at)
        self.expiries[key] = expires_at

    async def get_entry(self, key: str, *, now: datetime) -> tuple[dict[str, Any], datetime] | None:
        result = await self.get(key, now=now)
        return None if result is None else (result, self.expiries[key])


@pytest.fixture
def shared() -> Flaky:
    return Flaky()


@pytest.fixture
def tier(shared: Flaky) -> LocalCacheTier:
    return LocalCacheTier(shared, max_entries=3, local_ttl_seconds=30)


class TestLru:
    async def test_the_least_recently_used_copy_is_evicted(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        for name in "abc":
            await tier.set(name, answer(name), now=T0, expires_at=T0 + HOUR)
        assert await tier.get("a", now=T0) == answer("a")  # a is now the most recent
        await tier.set("d", answer("d"), now=T0, expires_at=T0 + HOUR)
        assert len(tier) == 3
        await shared.clear()  # from here on, only local copies can answer
        assert [await tier.get(name, now=T0) is not None for name in "abcd"] == [
            True,
            False,
            True,
            True,
        ]

    async def test_copies_read_from_the_shared_tier_count_against_the_bound(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        for name in "abcde":
            await shared.set(name, answer(name), now=T0, expires_at=T0 + HOUR)
            assert await tier.get(name, now=T0) == answer(name)
        assert len(tier) == 3
        shared.reads = 0
        await tier.get("a", now=T0)
        await tier.get("e", now=T0)
        assert shared.reads == 1  # a was evicted, e was local


class TestExpiry:
    async def test_a_copy_is_never_served_past_its_entrys_expiry(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        await tier.set("k", answer("k"), now=T0, expires_at=at(10))
        shared.down = True  # so a hit can only be local
        assert await tier.get("k", now=at(9.999)) == answer("k")
        with pytest.raises(ConnectionError):
            await tier.get("k", now=at(10))

    async def test_a_copy_lives_at_most_local_ttl_seconds(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        await tier.set("written", answer("w"), now=T0, expires_at=T0 + HOUR)
        await shared.set("read", answer("r"), now=T0, expires_at=T0 + HOUR)
        assert await tier.get("read", now=T0) == answer("r")
        await shared.clear()  # e.g. another process cleared the shared cache
        assert await tier.get("written", now=at(29.9)) == answer("w")
        assert await tier.get("read", now=at(29.9)) == answer("r")
        assert await tier.get("written", now=at(30)) is None
        assert await tier.get("read", now=at(30)) is None

    async def test_a_copy_read_from_a_tier_that_knows_expiries_ends_with_the_entry(
        self,
    ) -> None:
        shared = KnowsExpiry()
        tier = LocalCacheTier(shared, local_ttl_seconds=30)
        await shared.set("k", answer("k"), now=T0, expires_at=at(5))
        assert await tier.get("k", now=T0) == answer("k")
        shared.down = True
        assert await tier.get("k", now=at(4.9)) == answer("k")
        with pytest.raises(ConnectionError):
            await tier.get("k", now=at(5))

    async def test_an_already_expired_write_drops_the_local_copy(
        self, tier: LocalCacheTier
    ) -> None:
        await tier.set("k", answer("old"), now=T0, expires_at=T0 + HOUR)
        await tier.set("k", answer("new"), now=T0, expires_at=T0)
        assert len(tier) == 0
        assert await tier.get("k", now=T0) is None

    async def test_delete_expired_purges_local_copies_and_counts_shared_entries(
        self, tier: LocalCacheTier
    ) -> None:
        await tier.set("old", answer("o"), now=T0, expires_at=at(10))
        await tier.set("fresh", answer("f"), now=T0, expires_at=T0 + HOUR)
        assert await tier.delete_expired(now=at(20)) == 1
        assert len(tier) == 1
        assert await tier.count(now=at(20)) == 1


class TestSharedFailures:
    async def test_fresh_local_copies_are_served_while_the_shared_tier_is_down(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        await tier.set("k", answer("k"), now=T0, expires_at=T0 + HOUR)
        shared.down = True
        assert await tier.get("k", now=at(1)) == answer("k")
        with pytest.raises(ConnectionError):
            await tier.get("absent", now=at(1))

    async def test_a_failed_shared_write_still_keeps_the_local_copy(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        shared.down = True
        with pytest.raises(ConnectionError):
            await tier.set("k", answer("k"), now=T0, expires_at=T0 + HOUR)
        assert await tier.get("k", now=T0) == answer("k")
        shared.down = False
        assert await shared.get("k", now=T0) is None

    async def test_clear_drops_local_copies_even_when_the_shared_clear_fails(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        await tier.set("k", answer("k"), now=T0, expires_at=T0 + HOUR)
        shared.down = True
        with pytest.raises(ConnectionError):
            await tier.clear()
        assert len(tier) == 0


class TestClearAndCopies:
    async def test_clear_empties_both_tiers(self, shared: Flaky, tier: LocalCacheTier) -> None:
        await tier.set("k", answer("k"), now=T0, expires_at=T0 + HOUR)
        await tier.clear()
        assert await shared.get("k", now=T0) is None
        assert await tier.get("k", now=T0) is None
        assert await tier.count(now=T0) == 0

    async def test_a_read_racing_clear_does_not_bring_the_entry_back(self) -> None:
        gate = asyncio.Event()

        class Stalling(MemoryCacheRepository):
            async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
                result = await super().get(key, now=now)
                await gate.wait()  # the value was read; the reply is still on its way
                return result

        shared = Stalling()
        tier = LocalCacheTier(shared)
        await shared.set("k", answer("k"), now=T0, expires_at=T0 + HOUR)
        read = asyncio.create_task(tier.get("k", now=T0))
        await asyncio.sleep(0)
        await tier.clear()
        gate.set()
        assert await read == answer("k")  # it was read before the clear
        assert len(tier) == 0

    async def test_results_are_copied_in_and_out(self, tier: LocalCacheTier) -> None:
        original = answer("k")
        await tier.set("k", original, now=T0, expires_at=T0 + HOUR)
        original["products"].append("mutated by the caller")
        served = await tier.get("k", now=T0)
        assert served == answer("k")
        assert served is not None
        served["answer"] = "mutated by the reader"
        assert await tier.get("k", now=T0) == answer("k")


class TestStats:
    async def test_each_read_is_counted_where_it_was_answered(
        self, shared: Flaky, tier: LocalCacheTier
    ) -> None:
        await shared.set("remote", answer("r"), now=T0, expires_at=T0 + HOUR)
        await tier.set("local", answer("l"), now=T0, expires_at=T0 + HOUR)
        await tier.get("local", now=T0)
        await tier.get("remote", now=T0)  # shared, then kept locally
        await tier.get("remote", now=T0)
        await tier.get("absent", now=T0)
        shared.down = True
        with pytest.raises(ConnectionError):
            await tier.get("absent", now=T0)
        assert tier.stats.snapshot() == {
            "hits_local": 2,
            "hits_shared": 1,
            "misses": 1,
            "shared_errors": 1,
            "local_hit_ratio": 0.5,
            "shared_hit_ratio": 0.25,
        }

    async def test_stats_can_be_shared_and_bad_settings_are_refused(self, shared: Flaky) -> None:
        stats = TierStats()
        await LocalCacheTier(shared, stats=stats).get("k", now=T0)
        assert stats.misses == 1
        with pytest.raises(ValueError):
            LocalCacheTier(shared, max_entries=0)
        with pytest.raises(ValueError):
            LocalCacheTier(shared, local_ttl_seconds=0)
