"""Section `outage`: what the outage journal costs (SPEC §9).

1. Deductions the fallback serves while the database is down, each journaled and synced
   before it is acknowledged, at c=8, against the least a durable write costs here: one
   loop inserting one row per commit into an SQLite file with the same settings (WAL,
   synchronous=FULL), on the same disk. Group commit lets the journal pass the loop's
   one sync per row.
2. What the snapshot costs while the database is up: the service's deduction with the
   fallback (whose wrappers refresh the snapshot on every answer) against without.

Rounds alternate between the two variants of each comparison; medians are compared.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from app.config import OutageFallback as OutageFallbackMode
from app.container import build_container
from app.domain.credits import Attempt, CreditRules, Deduct, Operation
from app.domain.state import Merged
from app.errors import StorageUnavailableError
from app.outage.fallback import OutageFallback
from app.outage.journal import CreditChange, OutageJournal, encode
from app.outage.stores import with_fallback
from app.repositories.base import Stores
from app.repositories.memory import memory_stores
from app.schemas import CreditTransaction, UserCredits
from app.services.credits import CreditService
from bench import fixtures
from bench.context import Context
from bench.credit_variants import MAX_CONCURRENCY
from bench.load import LoadResult, Worker, run_load, stateless
from bench.report import heading, ms, rate, say, table
from bench.server import bench_settings

CONCURRENCY = 8
RULES = CreditRules(guest_max=10, registered_max=10**12, reset_period=timedelta(days=1))


class _DownState:
    """The database's users as a whole with the circuit open: every merge refused at once."""

    async def merge(self, carried: object) -> Merged:
        raise StorageUnavailableError("the database is down (bench)")


class _DownCredits:
    """The database's credits with the circuit open: every call refused at once."""

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        raise StorageUnavailableError("the database is down (bench)")

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        raise StorageUnavailableError("the database is down (bench)")

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        raise StorageUnavailableError("the database is down (bench)")


@asynccontextmanager
async def _journaled(directory: Path) -> AsyncIterator[CreditService]:
    journal = OutageJournal.open(directory / "journal.db")
    fallback = OutageFallback(
        RULES,
        journal,
        _DownState(),  # type: ignore[arg-type]  # the replay's only call
        max_users=10**6,
        max_changes=10**9,
        snapshot_max_users=10,
    )
    down = memory_stores(RULES)
    stores = with_fallback(
        Stores(credits=_DownCredits(), consents=down.consents, cache=down.cache), fallback
    )
    try:
        yield CreditService(stores.credits)
    finally:
        await journal.close()


async def _fallback_round(ctx: Context, directory: Path) -> LoadResult:
    async with _journaled(directory) as service:

        def deduct(rng: random.Random) -> Callable[[], Awaitable[object]]:
            user = f"outage-{rng.randrange(10**9)}"
            return lambda: service.deduct_credits(user, 1, is_guest=False)

        return await run_load(stateless(deduct), CONCURRENCY, ctx.duration, ctx.warmup)


def _bare_round(ctx: Context, directory: Path) -> LoadResult:
    """One row per commit, synchronous=FULL in WAL mode, for as long as a load run."""
    body = encode(
        CreditChange("outage-123456789", Deduct(1, False), Attempt(datetime.now(UTC), "call:0" * 4))
    )
    connection = sqlite3.connect(directory / "bare.db", isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT)"
        )
        latencies: list[float] = []
        start = time.perf_counter() + ctx.warmup
        stop = start + ctx.duration
        while (began := time.perf_counter()) < stop:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO changes (body) VALUES (?)", (body,))
            connection.execute("COMMIT")
            ended = time.perf_counter()
            if start <= began:
                latencies.append(ended - began)
        return LoadResult(ctx.duration, latencies, len(latencies), 0, None)
    finally:
        connection.close()


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-outage-", dir=".") as directory:
        yield Path(directory)


async def _journal_figures(ctx: Context) -> None:
    rounds = 1 if ctx.quick else 5
    results: dict[str, list[LoadResult]] = {"bare SQLite loop": [], "journaled fallback": []}
    for _ in range(rounds):
        with _scratch() as directory:
            results["bare SQLite loop"].append(await asyncio.to_thread(_bare_round, ctx, directory))
        with _scratch() as directory:
            results["journaled fallback"].append(await _fallback_round(ctx, directory))
    medians = {name: statistics.median(r.ops_per_s for r in runs) for name, runs in results.items()}
    bare = medians["bare SQLite loop"]
    say(f"\n  deductions during an outage, c={CONCURRENCY} (median of {rounds} alternating rounds)")
    table(
        ["variant", "ops/s", "vs bare", "p50 ms", "p99 ms", "rounds"],
        [
            [
                name,
                rate(medians[name]),
                f"{medians[name] / bare:.2f}x" if bare else "-",
                ms(statistics.median(r.p50 or 0 for r in runs)),
                ms(statistics.median(r.p99 or 0 for r in runs)),
                " ".join(rate(r.ops_per_s) for r in runs),
            ]
            for name, runs in results.items()
        ],
    )
    journaled = medians["journaled fallback"]
    ctx.targets.check(
        "outage: journaled fallback deductions vs bare SQLite insert loop (same sync)",
        f"{journaled / bare:.2f}x, target >= 0.70x" if bare else "bare loop failed",
        bool(bare) and journaled / bare >= 0.70,
    )


def _deductions(service: CreditService, pick: Callable[[random.Random], str]) -> Worker:
    return stateless(lambda rng: lambda: service.deduct_credits(pick(rng)))


async def _snapshot_figures(ctx: Context) -> None:
    url = await ctx.main_db()
    rounds = 1 if ctx.quick else 5

    def pick(rng: random.Random) -> str:
        return fixtures.user_id(fixtures.POOL_PREFIX, rng.randrange(fixtures.POOL_USERS))

    served: dict[str, list[float]] = {"without fallback": [], "with fallback (snapshot)": []}
    with _scratch() as directory:
        variants = {
            "without fallback": bench_settings(url, pool=MAX_CONCURRENCY + 8),
            "with fallback (snapshot)": bench_settings(
                url,
                pool=MAX_CONCURRENCY + 8,
                db_outage_fallback=OutageFallbackMode.MEMORY,
                outage_journal_path=directory / "journal.db",
            ),
        }
        for _ in range(rounds):
            for name, settings in variants.items():
                container = build_container(settings)
                try:
                    if container.fallback is not None:
                        await container.fallback.start()
                    result = await run_load(
                        _deductions(container.credit_service(), pick),
                        CONCURRENCY,
                        ctx.duration,
                        ctx.warmup,
                    )
                finally:
                    await container.close()
                if result.first_error:
                    say(f"  {name}: first error: {result.first_error}")
                served[name].append(result.ops_per_s)
    medians = {name: statistics.median(values) for name, values in served.items()}
    without, with_snapshot = medians.values()
    say(f"\n  service deduct, database up, c={CONCURRENCY} (median of {rounds} alternating rounds)")
    table(
        ["variant", "ops/s", "vs without", "rounds"],
        [
            [
                name,
                rate(medians[name]),
                f"{medians[name] / without:.2f}x",
                " ".join(map(rate, values)),
            ]
            for name, values in served.items()
        ],
    )
    ctx.targets.check(
        "outage: the snapshot's cost to service deduct with the database up",
        f"{with_snapshot / without:.2f}x without it, target >= 0.95x",
        with_snapshot / without >= 0.95,
    )


async def run(ctx: Context) -> None:
    heading("outage: the journal (SPEC §9)")
    await _journal_figures(ctx)
    await _snapshot_figures(ctx)
