"""Section `scale`: deduction and history as the tables grow (10k → 100k → 1M accounts).

One database grows in place: the ledger is loaded once (1M rows, 100 per account
over the first 10k accounts, so every history query returns a full page of 50),
then accounts are added and the same two workloads run at each size through the
service layer at c=8, each the median of three runs. Deductions pick uniformly among
all accounts, so at 1M the working set outgrows shared_buffers as it would in production.
"""

from __future__ import annotations

import random
import time

from app.container import build_container
from bench import fixtures
from bench.context import Context
from bench.load import LoadResult, Op, run_load, stateless
from bench.report import heading, load_cells, ms, rate, say, table
from bench.server import bench_settings

CONCURRENCY = 8
PREFIX = "scale-"
ROWS_PER_HISTORY_USER = 100


def _plan(quick: bool) -> tuple[list[int], int]:
    """Account counts to measure at, and ledger rows."""
    return ([10_000, 100_000], 100_000) if quick else ([10_000, 100_000, 1_000_000], 1_000_000)


async def _measure(ctx: Context, url: str, users: int, history_users: int) -> list[LoadResult]:
    container = build_container(bench_settings(url, pool=CONCURRENCY + 8))
    credits = container.credit_service()

    def deduct(rng: random.Random) -> Op:
        return lambda: credits.deduct_credits(fixtures.user_id(PREFIX, rng.randrange(users)))

    def history(rng: random.Random) -> Op:
        async def op() -> None:
            user = fixtures.user_id(PREFIX, rng.randrange(history_users))
            if len(await credits.get_transaction_history(user, 50)) != 50:
                raise LookupError(f"{user}: fewer than 50 ledger rows")

        return op

    try:
        results = []
        for make in (deduct, history):
            # Sizes cannot be interleaved (the tables grow in place): the median of a few
            # runs back to back keeps one disturbed run from deciding the target.
            runs = [
                await run_load(stateless(make), CONCURRENCY, ctx.duration, ctx.warmup)
                for _ in range(1 if ctx.quick else 3)
            ]
            result = sorted(runs, key=lambda run: run.ops_per_s)[len(runs) // 2]
            if result.first_error:
                say(f"  {users:,} accounts, {make.__name__}: first error: {result.first_error}")
            results.append(result)
        return results
    finally:
        await container.close()


async def run(ctx: Context) -> None:
    sizes, ledger_rows = _plan(ctx.quick)
    heading(f"scale: service layer, c={CONCURRENCY}, {ledger_rows:,} ledger rows")
    if ctx.quick:
        say("  --quick: 10k and 100k accounts and 100k ledger rows only (the full run: 1M and 1M)")
    url = await ctx.databases.create("scale")
    history_users = ledger_rows // ROWS_PER_HISTORY_USER
    conn = await fixtures.connect(url)
    measured: dict[int, list[LoadResult]] = {}
    try:
        started = time.monotonic()
        await fixtures.load_ledger(conn, PREFIX, history_users, ledger_rows, age_days=(0, 30))
        loaded = 0
        for users in sizes:
            await fixtures.load_users(conn, PREFIX, loaded, users)
            loaded = users
            await fixtures.vacuum_analyze(conn)
            say(f"  .. {users:,} accounts loaded ({time.monotonic() - started:.0f} s so far)")
            try:
                measured[users] = await _measure(ctx, url, users, history_users)
            except Exception as error:
                say(f"  {users:,} accounts: failed: {type(error).__name__}: {error}")
    finally:
        await conn.close()
    _report(ctx, sizes, measured)


def _report(ctx: Context, sizes: list[int], measured: dict[int, list[LoadResult]]) -> None:
    smallest = measured.get(sizes[0])
    rows = []
    for users in sizes:
        deduct, history = measured.get(users, [None, None])
        base_deduct, base_history = smallest if smallest else (None, None)
        rows.append(
            [
                f"{users:,}",
                *load_cells(deduct, base_deduct)[:4],
                *load_cells(history, base_history)[:4],
            ]
        )
    say(f"  ratio = ops/s over {sizes[0]:,} accounts")
    headers = ["accounts", "deduct/s", "ratio", "p50 ms", "p99 ms"]
    table([*headers, "history/s", "ratio", "p50 ms", "p99 ms"], rows)
    largest = measured.get(sizes[-1])
    met = None
    detail = "not measured"
    if smallest and largest and smallest[0].ops and largest[0].ops:
        share = largest[0].ops_per_s / smallest[0].ops_per_s
        met = share >= 0.8
        detail = (
            f"{rate(largest[0].ops_per_s)} at {sizes[-1]:,} vs {rate(smallest[0].ops_per_s)} "
            f"at {sizes[0]:,} accounts = {share:.2f}x; history p50 "
            f"{ms(largest[1].p50)} vs {ms(smallest[1].p50)} ms"
        )
        if ctx.quick:
            detail += " (--quick: 100k, not 1M)"
    ctx.targets.check(f"deduct throughput at {sizes[-1]:,} >= 0.8x at 10k accounts", detail, met)
