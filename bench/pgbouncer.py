"""Section `pgbouncer`: the service's deductions behind PgBouncer beside direct ones, and
the direct ones as clients grow.

Three ways, measured in alternating rounds (so that load from elsewhere falls on all of
them alike), median of each, at c=8, 32 and 64: the service straight to PostgreSQL as it
runs by default; through a PgBouncer in transaction pooling mode with its default settings
(tests/support/pgbouncer.py) and DB_PREPARED_STATEMENTS=false, the statement timeout set
in each transaction (DB_STATEMENT_TIMEOUT_MS, the default); and the same with the timeout
on the role instead (`ALTER ROLE … SET statement_timeout`, DB_STATEMENT_TIMEOUT_MS=0), as
docs/operations.md advises. The ratio is to the first at the same concurrency; the direct figures
at c=32 and c=64 are also put against its own at c=8.
"""

from __future__ import annotations

import asyncpg

from app.container import build_container
from bench.context import Context
from bench.credit_variants import Service
from bench.credits import MODES
from bench.load import LoadResult, run_load
from bench.report import LOAD_HEADERS, heading, load_cells, rate, say, table
from bench.server import asyncpg_dsn, bench_settings

CONCURRENCY = (8, 32, 64)
# The service's connections (at most 48: bench_settings' pool and overflow, the fast
# path's 16 among them) stay within PgBouncer's default max_client_conn (100); it serves
# them on its default_pool_size (20) server connections, as it would in production.
POOL = 16
ROLE_TIMEOUT = "10s"  # what DB_STATEMENT_TIMEOUT_MS sets by default


class ConfiguredService(Service):
    """The service with its own name, reaching its database as `reach` says."""

    def __init__(self, name: str, reach: str | None = None, **settings: object) -> None:
        self.name = name
        self._reach = reach
        self._settings = settings

    async def open(self, url: str) -> None:
        settings = bench_settings(self._reach or url, pool=POOL, **self._settings)
        self.container = build_container(settings)
        self.service = self.container.credit_service()


async def run(ctx: Context) -> None:
    heading("pgbouncer: service deduct, direct and through PgBouncer (ops/s, latency in ms)")
    # Imported here: only this section needs the test support code (and pgbouncer).
    from tests.support.pgbouncer import PgBouncerUnavailable, start_pgbouncer

    url = await ctx.main_db()
    try:
        bouncer = start_pgbouncer(ctx.server.admin_url)
    except PgBouncerUnavailable as reason:
        say(f"  skipped: no PgBouncer ({reason})")
        return
    database = url.rsplit("/", 1)[1]
    # Every server connection PgBouncer opens for the role in this database applies it
    # (the direct variant's own startup parameter takes precedence over it).
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await admin.execute(
            f'ALTER ROLE CURRENT_USER IN DATABASE "{database}"'
            f" SET statement_timeout = '{ROLE_TIMEOUT}'"
        )
    finally:
        await admin.close()
    bounced = bouncer.url_for(database)
    variants = [
        ConfiguredService("direct"),
        ConfiguredService(
            "PgBouncer, timeout per transaction", bounced, db_prepared_statements=False
        ),
        ConfiguredService(
            "PgBouncer, timeout on the role",
            bounced,
            db_prepared_statements=False,
            db_statement_timeout_ms=0,
        ),
    ]
    rounds = 1 if ctx.quick else 5
    results: dict[tuple[str, int], list[LoadResult]] = {}
    opened: list[ConfiguredService] = []
    try:
        for variant in variants:
            await variant.open(url)
            opened.append(variant)
            # Open the pools before anything counts.
            await run_load(variant.worker(MODES["many users"]), max(CONCURRENCY), 0.0, ctx.warmup)
        for _ in range(rounds):
            for concurrency in CONCURRENCY:
                for variant in variants:
                    worker = variant.worker(MODES["many users"])
                    result = await run_load(worker, concurrency, ctx.duration, ctx.warmup)
                    results.setdefault((variant.name, concurrency), []).append(result)
    finally:
        for variant in opened:
            await variant.close()
        bouncer.stop()
    _print(ctx, variants, results, rounds)


def _median(runs: list[LoadResult]) -> LoadResult:
    return sorted(runs, key=lambda run: run.ops_per_s)[len(runs) // 2]


def _print(
    ctx: Context,
    variants: list[ConfiguredService],
    results: dict[tuple[str, int], list[LoadResult]],
    rounds: int,
) -> None:
    say(f"\n  many users, {rounds} alternating round(s), the median round of each;")
    say(f"  ratio = ops/s over '{variants[0].name}' at the same concurrency")
    rows = []
    for concurrency in CONCURRENCY:
        base = _median(results[(variants[0].name, concurrency)])
        for variant in variants:
            runs = results[(variant.name, concurrency)]
            rows.append([variant.name, str(concurrency), *load_cells(_median(runs), base)])
            if len(runs) > 1:
                spread = ", ".join(rate(run.ops_per_s) for run in runs)
                say(f"  .. {variant.name} c={concurrency}: {spread} ops/s")
    table(["variant", "c", *LOAD_HEADERS], rows)

    def ops(variant: ConfiguredService, concurrency: int) -> float:
        return _median(results[(variant.name, concurrency)]).ops_per_s

    direct, per_transaction, on_role = variants
    at_8 = ops(direct, 8)
    say("")
    for concurrency in CONCURRENCY[1:]:
        ratio = ops(direct, concurrency) / at_8 if at_8 else 0.0
        say(f"  direct c={concurrency} / direct c=8: {ratio:.2f}x")
    say(
        f"  PgBouncer, timeout per transaction / direct at c=8: "
        f"{ops(per_transaction, 8) / at_8 if at_8 else 0.0:.2f}x"
    )
    bounced = ops(on_role, 8) / at_8 if at_8 else 0.0
    ctx.targets.check(
        "service deduct through PgBouncer, timeout on the role >= 0.5x direct (c=8)",
        f"{rate(ops(on_role, 8))} vs {rate(at_8)} ops/s = {bounced:.2f}x, "
        f"median of {rounds} rounds",
        bounced >= 0.5 if at_8 else None,
    )
    held = ops(direct, 32) / at_8 if at_8 else 0.0
    ctx.targets.check(
        "service deduct direct at c=32 >= 0.9x at c=8",
        f"{rate(ops(direct, 32))} vs {rate(at_8)} ops/s = {held:.2f}x; c=64: "
        f"{rate(ops(direct, 64))} ops/s = {ops(direct, 64) / at_8 if at_8 else 0.0:.2f}x; "
        f"median of {rounds} rounds",
        held >= 0.9 if at_8 else None,
    )
