"""Section `credits`: deductions per second, five ways, many users and one hot user."""

from __future__ import annotations

import re
import statistics

import asyncpg

from bench import fixtures
from bench.context import Context
from bench.credit_variants import (
    MAX_CONCURRENCY,
    Memory,
    NaiveOrm,
    Picker,
    RawMinimal,
    RawSame,
    Service,
    Variant,
)
from bench.load import LoadResult, run_load
from bench.report import LOAD_HEADERS, heading, load_cells, rate, say, table

CONCURRENCY = (1, 8, MAX_CONCURRENCY)
POOL = [fixtures.user_id(fixtures.POOL_PREFIX, n) for n in range(fixtures.POOL_USERS)]
MODES: dict[str, Picker] = {
    "many users": lambda rng: POOL[rng.randrange(len(POOL))],
    "hot user": lambda rng: fixtures.HOT_USER,
}
BASELINE = RawMinimal.name


async def _balance(conn: asyncpg.Connection, mode: str) -> int:
    if mode == "hot user":
        sql = "SELECT available_credits FROM user_credits WHERE user_id = $1"
        return int(await conn.fetchval(sql, fixtures.HOT_USER))
    sql = "SELECT sum(available_credits) FROM user_credits WHERE user_id LIKE $1"
    return int(await conn.fetchval(sql, fixtures.POOL_PREFIX + "%"))


def _describe_capture(variant: RawSame) -> None:
    log = variant.log
    say(
        f"  captured steady-state deduct_credits: {log.statements} statement(s), "
        f"{log.transaction_control} transaction-control round trip(s), replayed as:"
    )
    for in_transaction, sent in variant.units:
        say(f"    {'BEGIN … COMMIT around' if in_transaction else 'autocommit'}:")
        for s in sent:
            sql = re.sub(r"\s+", " ", s.sql)
            say(f"      {sql[:150]}{' …' if len(sql) > 150 else ''}")
    if any(s.kind == "rollback" for s in log.sent):
        say("    note: the captured call ROLLED BACK a transaction; the replay commits it")


async def _measure(
    ctx: Context, variant: Variant, checker: asyncpg.Connection
) -> dict[tuple[str, int], tuple[LoadResult, int | None]]:
    results: dict[tuple[str, int], tuple[LoadResult, int | None]] = {}
    async with variant.sized(MAX_CONCURRENCY):
        # Open every pooled connection and prepare its statements before anything counts.
        await run_load(variant.worker(MODES["many users"]), MAX_CONCURRENCY, 0.0, ctx.warmup)
    for mode, pick in MODES.items():
        for concurrency in CONCURRENCY:
            async with variant.sized(concurrency):
                before = await _balance(checker, mode) if variant.in_database else 0
                result = await run_load(variant.worker(pick), concurrency, ctx.duration, ctx.warmup)
                drift = None
                if variant.in_database:
                    # Credits charged minus credits gone: > 0 means lost updates.
                    drift = result.ok_total - (before - await _balance(checker, mode))
            results[(mode, concurrency)] = (result, drift)
            say(
                f"  .. {variant.name:32} {mode:10} c={concurrency:<3} "
                f"{rate(result.ops_per_s):>8} ops/s"
                + (f"  first error: {result.first_error}" if result.first_error else "")
            )
    return results


async def run(ctx: Context) -> None:
    heading("credits: deduct one credit (ops/s, latency in ms)")
    url = await ctx.main_db()
    variants: list[Variant] = [RawMinimal(), RawSame(), Service(), NaiveOrm(), Memory()]
    results: dict[str, dict[tuple[str, int], tuple[LoadResult, int | None]]] = {}
    checker = await fixtures.connect(url)
    try:
        for variant in variants:
            try:
                await variant.open(url)
            except Exception as error:
                say(f"  {variant.name}: could not start: {type(error).__name__}: {error}")
                continue
            try:
                if isinstance(variant, RawSame):
                    _describe_capture(variant)
                results[variant.name] = await _measure(ctx, variant, checker)
            except Exception as error:
                say(f"  {variant.name}: failed: {type(error).__name__}: {error}")
            finally:
                await variant.close()
    finally:
        await checker.close()
    _print_tables(ctx, [v.name for v in variants], results)
    if ctx.quick:
        _check_targets(ctx, _single_runs(results), "single runs (--quick)")
    else:
        rounds = 5
        _check_targets(ctx, await _target_rounds(ctx, url, rounds), f"median of {rounds} rounds")


def _print_tables(
    ctx: Context,
    names: list[str],
    results: dict[str, dict[tuple[str, int], tuple[LoadResult, int | None]]],
) -> None:
    say(f"\n  ratio = ops/s over '{BASELINE}' at the same concurrency and user mix;")
    say("  drift = deductions that succeeded minus credits that left the balances (0 = none lost)")
    for mode in MODES:
        label = f"{fixtures.POOL_USERS:,} accounts" if mode == "many users" else "one account"
        say(f"\n  {mode} ({label})")
        rows = []
        for concurrency in CONCURRENCY:
            base = results.get(BASELINE, {}).get((mode, concurrency))
            for name in names:
                entry = results.get(name, {}).get((mode, concurrency))
                result, drift = entry if entry else (None, None)
                cells = load_cells(result, base[0] if base else None)
                rows.append([name, str(concurrency), *cells, "-" if drift is None else str(drift)])
        table(["variant", "c", *LOAD_HEADERS, "drift"], rows)


async def _target_rounds(ctx: Context, url: str, rounds: int) -> dict[str, float | None]:
    """The three variants the targets compare, re-run interleaved round after round at
    c=8 on many users, so that load from elsewhere on the machine falls on all of them
    alike; the median of each counts."""
    variants: list[Variant] = [RawMinimal(), Service(), NaiveOrm()]
    figures: dict[str, list[float]] = {v.name: [] for v in variants}
    opened: list[Variant] = []
    try:
        for variant in variants:
            await variant.open(url)
            opened.append(variant)
        for _ in range(rounds):
            for variant in variants:
                async with variant.sized(8):
                    worker = variant.worker(MODES["many users"])
                    result = await run_load(worker, 8, ctx.duration, ctx.warmup)
                figures[variant.name].append(result.ops_per_s)
    finally:
        for variant in opened:
            await variant.close()
    say(f"\n  target runs: c=8, many users, {rounds} interleaved rounds, median ops/s of")
    for name, values in figures.items():
        say(f"    {name:32} {rate(statistics.median(values)):>8}  ({', '.join(map(rate, values))})")
    return {name: statistics.median(values) if values else None for name, values in figures.items()}


def _single_runs(
    results: dict[str, dict[tuple[str, int], tuple[LoadResult, int | None]]],
) -> dict[str, float | None]:
    figures: dict[str, float | None] = {}
    for name in (RawMinimal.name, Service.name, NaiveOrm.name):
        entry = results.get(name, {}).get(("many users", 8))
        figures[name] = entry[0].ops_per_s if entry and entry[0].ops else None
    return figures


def _check_targets(ctx: Context, figures: dict[str, float | None], how: str) -> None:
    service = figures.get(Service.name)
    minimal = figures.get(RawMinimal.name)
    naive = figures.get(NaiveOrm.name)
    targets = ((minimal, "raw asyncpg minimal", 0.65), (naive, "naive ORM", 8))
    for baseline, label, factor in targets:
        met = None if service is None or baseline is None else service >= factor * baseline
        detail = (
            f"{rate(service)} vs {rate(baseline)} ops/s = {service / baseline:.2f}x, {how}"
            if service and baseline
            else "not measured"
        )
        ctx.targets.check(f"service deduct >= {factor}x {label} (c=8, many users)", detail, met)
