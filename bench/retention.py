"""Section `retention`: deleting 1M expired cache entries and 1M old ledger rows.

What matters is not only the total but the longest single statement: a DELETE
holds its row locks (and the transaction around it holds them until COMMIT), so
one huge statement stalls every writer it meets. Both are timed with cursor
events; live rows sit next to the expired ones and must survive. The container
keeps the production statement timeout, so a cleanup that is one statement too
many seconds long fails here as it would in production.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from app.container import build_container
from bench import fixtures
from bench.capture import StatementLog
from bench.context import Context
from bench.report import heading, say, table
from bench.server import bench_settings

LIVE = 10_000  # rows that are not due and must stay


async def _load(url: str, rows: int) -> bool:
    conn = await fixtures.connect(url)
    try:
        await fixtures.load_cache(conn, "expired ", rows, expired=True)
        await fixtures.load_cache(conn, "live ", LIVE, expired=False)
        await fixtures.load_ledger(conn, "old-", 10_000, rows, age_days=(100, 400))
        await fixtures.load_ledger(conn, "new-", 1_000, LIVE, age_days=(0, 30))
        keys = await fixtures.load_keys(conn, "old-", rows, age_days=100)
        await fixtures.vacuum_analyze(conn)
        return keys
    finally:
        await conn.close()


async def _remaining(url: str) -> tuple[int, int]:
    conn = await fixtures.connect(url)
    try:
        cache = await conn.fetchval("SELECT count(*) FROM query_cache")
        ledger = await conn.fetchval("SELECT count(*) FROM credit_transactions")
        return int(cache), int(ledger)
    finally:
        await conn.close()


async def run(ctx: Context) -> None:
    rows = 100_000 if ctx.quick else 1_000_000
    heading(f"retention: cleanup of {rows:,} expired cache entries and {rows:,} old ledger rows")
    if ctx.quick:
        say("  --quick: 100k rows each (the full run: 1M)")
    url = await ctx.databases.create("retention")
    started = time.monotonic()
    keys = await _load(url, rows)
    say(
        f"  .. loaded in {time.monotonic() - started:.0f} s"
        + (f", with {rows:,} old idempotency keys" if keys else "")
    )
    container = build_container(bench_settings(url))
    outcome: dict[str, tuple[int, float, StatementLog]] = {}
    try:
        jobs: dict[str, Callable[[], Awaitable[int]]] = {
            "QueryCacheService.cleanup_expired()": container.cache_service().cleanup_expired,
            "CreditService.cleanup_old_transactions(90)": lambda: (
                container.credit_service().cleanup_old_transactions(90)
            ),
        }
        for name, job in jobs.items():
            try:
                with StatementLog(container.engine) as log:
                    began = time.perf_counter()
                    deleted = await job()
                    outcome[name] = (deleted, time.perf_counter() - began, log)
            except Exception as error:
                say(f"  {name}: failed: {type(error).__name__}: {error}")
    finally:
        await container.close()
    cache_left, ledger_left = await _remaining(url)
    say(f"  left after cleanup: {cache_left:,} cache entries, {ledger_left:,} ledger rows")
    _report(ctx, rows, outcome, ok=cache_left == LIVE and ledger_left == LIVE)


def _report(
    ctx: Context, rows: int, outcome: dict[str, tuple[int, float, StatementLog]], *, ok: bool
) -> None:
    table_rows = []
    for name, (deleted, seconds, log) in outcome.items():
        table_rows.append(
            [
                name,
                f"{deleted:,}",
                f"{seconds:.2f}",
                str(log.statements),
                f"{log.longest_statement:.3f}",
                f"{log.longest_transaction:.3f}",
            ]
        )
    headers = ["cleanup", "deleted", "total s", "statements", "longest stmt s", "longest tx s"]
    table(headers, table_rows)
    if not ok:
        say(f"  WARNING: expected {LIVE:,} live rows left in each table")
    longest = max((log.longest_statement for _, _, log in outcome.values()), default=None)
    met = None if len(outcome) < 2 or longest is None else longest <= 1.0 and ok
    detail = "not measured" if longest is None else f"longest statement {longest:.3f} s"
    detail += "" if len(outcome) == 2 else " (a cleanup failed)"
    if ctx.quick:
        detail += f" (--quick: {rows:,} rows, not 1M)"
    ctx.targets.check("longest cleanup statement <= 1 s", detail, met)
