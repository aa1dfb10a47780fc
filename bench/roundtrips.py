"""Section `roundtrips`: what each service method sends to PostgreSQL (bench/capture.py).

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
from bench.capture import StatementLog
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


Counts = tuple[int, int]  # statements, transaction control


async def _count(engine: object, case: Case, key: str) -> Counts:
    with StatementLog(engine) as log:  # type: ignore[arg-type]
        await case.call(key)
    return log.statements, log.transaction_control


def _cells(counts: Counts | None) -> list[str]:
    if counts is None:
        return ["-", "-", "-"]
    return [str(counts[0]), str(counts[1]), str(sum(counts))]


async def run(ctx: Context) -> None:
    heading("roundtrips: database round trips per call (warm connection)")
    url = await ctx.main_db()
    container = build_container(bench_settings(url, pool=1, db_max_overflow=0))
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
    say("  stmts = statements; tx = BEGIN/COMMIT/ROLLBACK sent; rt = round trips (the sum)")
    rows = [[name, *_cells(steady), *_cells(first)] for name, (steady, first) in counted.items()]
    table(["method", "steady stmts", "tx", "rt", "first sight stmts", "tx", "rt"], rows)
    _check(ctx, counted)


def _check(ctx: Context, counted: dict[str, tuple[Counts, Counts | None]]) -> None:
    deduct = counted.get("CreditService.deduct_credits")
    if deduct is None or deduct[1] is None:
        ctx.targets.check(
            "deduct_credits round trips: steady = 1, first sight <= 2", "not measured", None
        )
        return
    steady, first = sum(deduct[0]), sum(deduct[1])
    ctx.targets.check(
        "deduct_credits round trips: steady = 1, first sight <= 2",
        f"steady {steady}, first sight {first}",
        steady == 1 and first <= 2,
    )
    above = [
        f"{name.split('.')[1]} ({sum(steady)})"
        for name, (steady, _) in counted.items()
        if name.startswith("CreditService.") and sum(steady) > 1
    ]
    say(f"  credit methods above one round trip in the steady state: {', '.join(above) or 'none'}")
