"""Section `fillfactor`: does a lower fillfactor on the hot `user_credits` table pay?

Every credit operation updates its account's row. PostgreSQL can update a row in place
(a HOT update: no new index entry) only when the row's page has room for the new version;
a table loaded full (fillfactor 100, the default) has none until vacuum frees some. Two
databases with the same accounts, one at each fillfactor (rewritten with VACUUM FULL),
take the service's deductions at c=8 in alternating rounds; the section prints the
throughput and the share of HOT updates each saw. docs/operations.md keeps a lower fillfactor
only if this says it pays.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Awaitable, Callable

from app.container import build_container
from bench import fixtures
from bench.context import Context
from bench.credit_variants import MAX_CONCURRENCY
from bench.load import run_load, stateless
from bench.report import heading, rate, say, table
from bench.server import bench_settings

CONCURRENCY = 8
FILLFACTORS = (100, 80)
USERS = 10_000


async def _database(ctx: Context, fillfactor: int) -> str:
    url = await ctx.databases.create(f"fillfactor_{fillfactor}")
    conn = await fixtures.connect(url)
    try:
        await fixtures.load_users(conn, fixtures.POOL_PREFIX, 0, USERS)
        await conn.execute(f"ALTER TABLE user_credits SET (fillfactor = {fillfactor})")
        await conn.execute("VACUUM FULL user_credits")
        await fixtures.vacuum_analyze(conn)
        await conn.execute("SELECT pg_stat_reset()")
    finally:
        await conn.close()
    return url


async def _round(url: str, ctx: Context) -> float:
    container = build_container(bench_settings(url, pool=MAX_CONCURRENCY + 8))
    try:
        service = container.credit_service()

        def deduct(rng: random.Random) -> Callable[[], Awaitable[object]]:
            return lambda: service.deduct_credits(
                fixtures.user_id(fixtures.POOL_PREFIX, rng.randrange(USERS))
            )

        result = await run_load(stateless(deduct), CONCURRENCY, ctx.duration, ctx.warmup)
    finally:
        await container.close()
    if result.first_error:
        say(f"  first error: {result.first_error}")
    return result.ops_per_s


async def _hot_share(url: str) -> tuple[int, float]:
    conn = await fixtures.connect(url)
    try:
        updated, hot = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
            "WHERE relname = 'user_credits'"
        )
    finally:
        await conn.close()
    return int(updated), (hot / updated if updated else 0.0)


async def run(ctx: Context) -> None:
    heading(f"fillfactor: service deduct on user_credits at each fillfactor, c={CONCURRENCY}")
    urls = {fillfactor: await _database(ctx, fillfactor) for fillfactor in FILLFACTORS}
    rounds = 1 if ctx.quick else 5
    served: dict[int, list[float]] = {fillfactor: [] for fillfactor in FILLFACTORS}
    for _ in range(rounds):
        for fillfactor, url in urls.items():
            served[fillfactor].append(await _round(url, ctx))
    await asyncio.sleep(1.5)  # the backends' statistics reach pg_stat_user_tables
    medians = {fillfactor: statistics.median(values) for fillfactor, values in served.items()}
    default = medians[FILLFACTORS[0]]
    rows = []
    for fillfactor, url in urls.items():
        updated, hot = await _hot_share(url)
        rows.append(
            [
                str(fillfactor),
                rate(medians[fillfactor]),
                f"{medians[fillfactor] / default:.2f}x" if default else "-",
                f"{updated:,}",
                f"{hot:.0%}",
                " ".join(map(rate, served[fillfactor])),
            ]
        )
    say(f"\n  median of {rounds} alternating rounds, {USERS:,} accounts")
    table(["fillfactor", "ops/s", "vs 100", "updates", "HOT", "rounds"], rows)
