"""Section `roundtrips`: what each service method sends to PostgreSQL (bench/capture.py),
seen through SQLAlchemy's events and counted at the driver, where the fast paths run.

The container gets a pool of ONE connection, and every case runs once before it
is counted, so each statement is already prepared on that connection: the counts
are those of a warm process. "steady" = the user (consent, cache entry) exists
and no reset is due; "first sight" = it does not exist yet. The set-up of a
steady case (creating the account it needs, say) is not counted.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.container import build_container
from app.errors import ConsentNotFoundError
from bench.capture import DriverLog, StatementLog
from bench.context import Context
from bench.report import heading, say, table
from bench.server import bench_settings

Call = Callable[[str], Awaitable[object]]
ANSWER = {"answer": "bench", "products": []}


@dataclass
class Case:
    name: str
    call: Call
    prepare: Call | None = None  # makes `key` exist, for the steady state
    keyed: bool = True  # False: the method takes no user or query; counted once


def _cases(container: object) -> list[Case]:
    credits = container.credit_service()  # type: ignore[attr-defined]
    consents = container.consent_service()  # type: ignore[attr-defined]
    cache = container.cache_service()  # type: ignore[attr-defined]

    async def account(user: str) -> None:  # an existing guest with room for a refund
        await credits.deduct_credits(user, 2)

    async def consent(user: str) -> None:
        await consents.record_consent(user)

    async def entry(query: str) -> None:
        await cache.cache_result(query, ANSWER)

    async def update_marketing(user: str) -> None:
        with contextlib.suppress(ConsentNotFoundError):  # first sight: the error is the answer
            await consents.update_marketing_consent(user, True)

    return [
        Case("CreditService.get_user_credits", credits.get_user_credits, account),
        Case("CreditService.check_credits", credits.check_credits, account),
        Case("CreditService.deduct_credits", credits.deduct_credits, account),
        Case("CreditService.refund_credits", lambda u: credits.refund_credits(u, 1), account),
        Case("CreditService.upgrade_to_registered", credits.upgrade_to_registered, account),
        Case("CreditService.reset_credits", credits.reset_credits, account),
        Case("CreditService.get_transaction_history", credits.get_transaction_history, account),
        Case(
            "CreditService.cleanup_old_transactions",
            lambda _: credits.cleanup_old_transactions(90),
            keyed=False,
        ),
        Case("UserConsentService.get_consent", consents.get_consent, consent),
        Case("UserConsentService.record_consent", consents.record_consent, consent),
        Case("UserConsentService.update_marketing_consent", update_marketing, consent),
        Case("UserConsentService.has_accepted_terms", consents.has_accepted_terms, consent),
        Case("UserConsentService.list_consents", lambda _: consents.list_consents(), keyed=False),
        Case("QueryCacheService.get_cached_result", cache.get_cached_result, entry),
        Case("QueryCacheService.cache_result", lambda q: cache.cache_result(q, ANSWER), entry),
        Case("QueryCacheService.cleanup_expired", lambda _: cache.cleanup_expired(), keyed=False),
        Case("QueryCacheService.get_stats", lambda _: cache.get_stats(), keyed=False),
        Case("QueryCacheService.clear_cache", lambda _: cache.clear_cache(), keyed=False),
    ]


Counts = tuple[int, int, int]  # SQLAlchemy events: statements, transaction control; driver


async def _count(engine: object, case: Case, key: str) -> Counts:
    with StatementLog(engine) as events, DriverLog() as driver:  # type: ignore[arg-type]
        await case.call(key)
    return events.statements, events.transaction_control, driver.round_trips


def _cells(counts: Counts | None) -> list[str]:
    return ["-", "-", "-"] if counts is None else [str(count) for count in counts]


async def run(ctx: Context) -> None:
    heading("roundtrips: database round trips per call (warm connection)")
    url = await ctx.main_db()
    # One connection each for the general path and the fast path: every call warm.
    container = build_container(
        bench_settings(url, pool=1, db_max_overflow=1, db_fast_path_connections=1)
    )
    fresh = (f"rt-{n:06d}" for n in itertools.count())
    counted: dict[str, tuple[Counts, Counts | None]] = {}
    try:
        for case in _cases(container):
            try:
                for counting in (False, True):  # the first pass prepares the statements
                    steady_key = next(fresh)
                    if case.prepare is not None:
                        await case.prepare(steady_key)
                    steady = await _count(container.engine, case, steady_key)
                    first = (
                        await _count(container.engine, case, next(fresh)) if case.keyed else None
                    )
                    if counting:
                        counted[case.name] = (steady, first)
            except Exception as error:
                say(f"  {case.name}: failed: {type(error).__name__}: {error}")
    finally:
        await container.close()
    say(
        "  seen by SQLAlchemy events: stmts = statements, tx = BEGIN/COMMIT/ROLLBACK;\n"
        "  rt = round trips counted at the driver (asyncpg): everything sent, the fast\n"
        "  paths (asyncpg directly, unseen by SQLAlchemy's events) included"
    )
    rows = [[name, *_cells(steady), *_cells(first)] for name, (steady, first) in counted.items()]
    table(["method", "steady stmts", "tx", "rt", "first sight stmts", "tx", "rt"], rows)
    _check(ctx, counted)


def _check(ctx: Context, counted: dict[str, tuple[Counts, Counts | None]]) -> None:
    """Every credit operation (retention aside): 1 round trip steady, <= 2 on first sight."""
    name = "credit operations: 1 round trip steady, <= 2 on first sight (driver count)"
    credit = {
        method: (steady[2], first[2])
        for method, (steady, first) in counted.items()
        if method.startswith("CreditService.") and first is not None
    }
    if len(credit) < 7:
        ctx.targets.check(name, "not all measured", None)
        return
    over = [f"{m.split('.')[1]} ({s}, {f})" for m, (s, f) in credit.items() if s > 1 or f > 2]
    deduct = credit["CreditService.deduct_credits"]
    detail = f"deduct_credits {deduct[0]} and {deduct[1]}; " + (
        f"over: {', '.join(over)}" if over else f"all {len(credit)} methods within"
    )
    ctx.targets.check(name, detail, not over)
