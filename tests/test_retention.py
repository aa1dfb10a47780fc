"""Scheduled retention: bounded batches, one replica at a time, on its interval."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.ops.retention import RETENTION_LOCK_KEY, RetentionJob
from app.repositories.database import sql_stores
from app.services.credits import CreditService
from app.services.query_cache import CacheStats, QueryCacheService
from tests.conftest import RULES
from tests.support.clock import FakeClock


def job(engine: AsyncEngine, clock: FakeClock, *, interval: float = 0) -> RetentionJob:
    stores = sql_stores(engine, RULES, batch_size=2)
    return RetentionJob(
        database=lambda: engine,
        credits=lambda: CreditService(stores.credits, clock=clock),
        cache=lambda: QueryCacheService(
            stores.cache, default_ttl_seconds=60, stats=CacheStats(), clock=clock
        ),
        retention_days=90,
        interval_seconds=interval,
    )


async def seed(engine: AsyncEngine, clock: FakeClock) -> None:
    stores = sql_stores(engine, RULES)
    credits = CreditService(stores.credits, clock=clock)
    cache = QueryCacheService(stores.cache, default_ttl_seconds=60, stats=CacheStats(), clock=clock)
    for n in range(5):
        await credits.deduct_credits(f"old-{n}", 1)
        await cache.cache_result(f"query {n}", {"answer": "a", "products": []})
    clock.advance(days=91)


class TestRunOnce:
    async def test_old_ledger_rows_and_expired_entries_go_in_batches(
        self, engine: AsyncEngine, clock: FakeClock
    ) -> None:
        await seed(engine, clock)
        counts = await job(engine, clock).run_once()
        assert counts == {"transactions_deleted": 5, "cache_entries_deleted": 5, "skipped": False}
        assert await job(engine, clock).run_once() == {
            "transactions_deleted": 0,
            "cache_entries_deleted": 0,
            "skipped": False,
        }


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
class TestOneReplicaAtATime:
    async def test_a_replica_skips_while_another_holds_the_lock(
        self, engine: AsyncEngine, clock: FakeClock
    ) -> None:
        await seed(engine, clock)
        async with engine.connect() as other_replica:
            await other_replica.execute(
                text("SELECT pg_advisory_lock(:key)"), {"key": RETENTION_LOCK_KEY}
            )
            skipped = await job(engine, clock).run_once()
            await other_replica.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": RETENTION_LOCK_KEY}
            )
        assert skipped["skipped"] is True and skipped["transactions_deleted"] == 0
        done = await job(engine, clock).run_once()
        assert (done["skipped"], done["transactions_deleted"]) == (False, 5)

    async def test_two_replicas_at_once_run_it_once(
        self, engine: AsyncEngine, clock: FakeClock
    ) -> None:
        await seed(engine, clock)
        results = await asyncio.gather(job(engine, clock).run_once(), job(engine, clock).run_once())
        assert sum(result["transactions_deleted"] for result in results) == 5


class TestSchedule:
    async def test_the_job_runs_by_itself_on_its_interval(
        self, engine: AsyncEngine, clock: FakeClock
    ) -> None:
        await seed(engine, clock)
        scheduled = job(engine, clock, interval=0.05)
        scheduled.start()
        try:
            stores = sql_stores(engine, RULES)
            credits = CreditService(stores.credits, clock=clock)
            for _ in range(100):
                if not await credits.get_transaction_history("old-0"):
                    break
                await asyncio.sleep(0.05)
            assert await credits.get_transaction_history("old-0") == []
        finally:
            await scheduled.stop()
