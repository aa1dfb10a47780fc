"""Section `pgbouncer`: the service's deductions behind PgBouncer beside direct ones.

Three ways, measured in alternating rounds (so that load from elsewhere falls on all of
them alike), median of each: the service straight to PostgreSQL as it runs by default;
straight to PostgreSQL with DB_PREPARED_STATEMENTS=false (what the setting costs by
itself); and through a PgBouncer in transaction pooling mode with its default settings
(tests/support/pgbouncer.py), DB_PREPARED_STATEMENTS=false. The ratio is to the first.
"""

from __future__ import annotations

from app.container import build_container
from bench.context import Context
from bench.credit_variants import Service
from bench.credits import MODES
from bench.load import LoadResult, run_load
from bench.report import LOAD_HEADERS, heading, load_cells, rate, say, table
from bench.server import bench_settings

CONCURRENCY = (8, 32)
# The service's connections (at most 48: bench_settings' pool and overflow, the fast
# path's 16 among them) stay within PgBouncer's default max_client_conn (100); it serves
# them on its default_pool_size (20) server connections, as it would in production.
POOL = 16


class ConfiguredService(Service):
    """The service with its own name, reaching its database as `reach` says."""

    def __init__(self, name: str, *, prepared: bool, reach: str | None = None) -> None:
        self.name = name
        self._prepared = prepared
        self._reach = reach

    async def open(self, url: str) -> None:
        settings = bench_settings(
            self._reach or url, pool=POOL, db_prepared_statements=self._prepared
        )
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
    variants = [
        ConfiguredService("direct", prepared=True),
        ConfiguredService("direct, DB_PREPARED_STATEMENTS=false", prepared=False),
        ConfiguredService(
            "PgBouncer (transaction pooling)", prepared=False, reach=bouncer.url_for(database)
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
    _print(variants, results, rounds)


def _median(runs: list[LoadResult]) -> LoadResult:
    return sorted(runs, key=lambda run: run.ops_per_s)[len(runs) // 2]


def _print(
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
    direct = _median(results[(variants[0].name, 8)]).ops_per_s
    bounced = _median(results[(variants[-1].name, 8)]).ops_per_s
    if direct:
        say(f"\n  PgBouncer path / direct path at c=8: {bounced / direct:.2f}x")
