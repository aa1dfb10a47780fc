"""PostgreSQL's users as a whole, on asyncpg (SPEC §7).

The same reads and the same one merge (app/domain/carry.py) as SqlStateRepository's, on
asyncpg, whose rows cost a fraction of SQLAlchemy's, writing a batch's plans a table at a
time (COPY for the rows it adds). A merge holds its users: the accounts it changes FOR
UPDATE, and every user by a transaction-scoped advisory lock, taken in one order, so that
two merges of the same users wait for each other, not deadlock, and one never decides on
what the other is writing.

An import's batch (`merge_rows`) of users the store holds nothing of, and has no erasure
of, is copied straight into the tables (COPY) and verified by reading back each user's
account, ledger count and sum, and consent: what the one merge would write for them
(FIRST CARRY), at the raw COPY's cost. Any other batch is merged as a hand-over's.

It only runs statements, each written whole in app/repositories/postgres/state_statements.py.
It is long for a module but one job: an import's copy is the merge's fast case, sharing
its transaction and its read (the copy's VERIFY), so that apart, each half would import
the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import Clock, utc_now
from app.domain.audit import LedgerFigures
from app.domain.carry import Carried, Plan, carry_all, outcome
from app.domain.credits import KEYED_KINDS, Account, Claim, CreditRules
from app.domain.privacy import Pseudonyms, is_pseudonym
from app.domain.state import (
    Erasure,
    KeyRecord,
    LedgerRecord,
    Merged,
    Tally,
    UserState,
    verified,
)
from app.repositories.base import (
    StagedBatch,
    StagedRows,
    carried_batch,
    erase_held,
    pseudonym_of,
    states_of,
)
from app.repositories.postgres.state_statements import (
    ANY_ERASED,
    CLAIM_KEYS,
    COPIED_HELD,
    COPY_ACCOUNTS,
    COPY_CONSENTS,
    COPY_EVENTS,
    COPY_KEYS,
    COPY_LEDGER,
    CUSTOM_PLANS,
    ERASURES_PAGE,
    HOLD,
    INSERT_ACCOUNTS,
    LOCK_ACCOUNTS,
    PAGE,
    READ_ACCOUNTS,
    READ_CONSENTS,
    READ_ERASURES,
    READ_EVENTS,
    READ_KEYS,
    READ_LEDGER,
    RECORD_ERASURE,
    UPDATE_ACCOUNT,
    WRITE_CONSENT,
    CopyInto,
)
from app.repositories.sql.audit import ledger_figures
from app.repositories.sql.state import MERGE_ATTEMPTS, MergeRaced, erase
from app.schemas import ConsentEvent, UserConsent


class PostgresStateRepository:
    """Users of a PostgreSQL store (see StateRepository and the module docstring), with
    SqlStateRepository's guarantees: a read sees one snapshot (REPEATABLE READ), a merge
    is one transaction holding its users."""

    def __init__(
        self,
        engine: AsyncEngine,
        rules: CreditRules,
        *,
        retention: timedelta,
        pseudonyms: Pseudonyms | None = None,
        transaction_setting: str | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._rules = rules
        self._retention = retention
        self._pseudonyms = pseudonyms
        self._clock = clock
        # Behind a transaction pooler, the statement timeout (app/db/pooler.py).
        self._setting = transaction_setting

    async def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        after = ""  # sorts before every user_id, none of which is empty
        while True:
            async with self._transaction(readonly=True) as driver:
                users = [row[0] for row in await driver.fetch(PAGE.sql, after, batch_size)]
            if users:
                yield users
            if len(users) < batch_size:
                return
            after = users[-1]

    async def erasures(self, batch_size: int) -> AsyncIterator[list[Erasure]]:
        after = ""
        while True:
            async with self._transaction(readonly=True) as driver:
                records = [
                    _erasure(row)
                    for row in await driver.fetch(ERASURES_PAGE.sql, after, batch_size)
                ]
            if records:
                yield records
            if len(records) < batch_size:
                return
            after = records[-1].pseudonym

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        async with self._transaction(isolation="repeatable_read", readonly=True) as driver:
            return await _read(driver, list(user_ids), self._pseudonyms)

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        if not carried:
            return Merged()
        for attempt in range(MERGE_ATTEMPTS):
            try:
                async with self._transaction() as driver:
                    return await self._merge(driver, carried)
            except MergeRaced:
                if attempt == MERGE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def merge_erasures(self, erasures: Sequence[Erasure]) -> int:
        new: dict[str, Erasure] = {}
        async with self._transaction() as driver:
            for record in erasures:
                if await driver.fetchval(RECORD_ERASURE.sql, *_erasure_row(record)) is not None:
                    new[record.pseudonym] = record
        return await erase_held(self, self._pseudonyms, new)

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        return await erase(self._engine, user_id, pseudonym, now)

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        # SqlStateRepository's statements: a batch comes back as one row per account.
        return await ledger_figures(self._engine, after, limit)

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        """The rows copied straight into the tables when the store holds nothing of their
        users (_copied), else merged as `merge` merges users."""
        # Only a batch whose every user comes with its account: the accounts' keys then
        # stand for every user in it.
        if not batch.lock:
            async with self._transaction() as driver:
                copied = await _copied(driver, batch, rows, self._pseudonyms)
            if copied is not None:
                return copied
        return await self.merge(carried_batch(batch, rows, self._pseudonyms))

    async def _merge(self, driver: asyncpg.Connection, carried: Sequence[Carried]) -> Merged:
        users = [one.user_id for one in carried]
        await driver.execute(HOLD.sql, users)
        held = await _read(driver, users, self._pseudonyms, lock=True)
        horizon = self._clock() - self._retention
        plans = carry_all(held, carried, self._rules, horizon)
        held_accounts = {state.user_id for state in held if state.account is not None}
        await _write(driver, plans, held_accounts)
        return outcome(plans, await _read(driver, users, self._pseudonyms))

    @asynccontextmanager
    async def _transaction(self, **options: Any) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection's own asyncpg connection, in a transaction of asyncpg's
        (`options`: its isolation and read-only). SQLAlchemy begins nothing on it, so its
        return to the pool finds no transaction of SQLAlchemy's to end."""
        async with self._engine.connect() as conn:
            driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            if driver.is_closed():
                # Closed under it while it sat in the pool: dropped from the pool, and the
                # unit of work fails as a connection fault (retried on another).
                await conn.invalidate()
                raise ConnectionResetError("a pooled connection was found closed")
            try:
                async with driver.transaction(**options):
                    if self._setting is not None:
                        await driver.execute(self._setting)
                    yield driver
            except Exception as error:
                if not driver.is_closed():
                    raise
                # Closed under the unit of work: asyncpg's error on the way out (an
                # InterfaceError, rolling back on a closed connection) says nothing of the
                # change; a connection fault, retried on another, then unavailable.
                await conn.invalidate()
                raise ConnectionResetError("the connection closed under a unit of work") from error


async def _read(
    driver: asyncpg.Connection,
    named: list[str],
    pseudonyms: Pseudonyms | None,
    *,
    lock: bool = False,
) -> list[UserState]:
    """Each named user as the store holds them, one statement a table (`lock`: the
    accounts held until the transaction ends)."""
    await driver.execute(CUSTOM_PLANS.sql)
    accounts = {
        row[0]: Account(*row)
        for row in await driver.fetch((LOCK_ACCOUNTS if lock else READ_ACCOUNTS).sql, named)
    }
    ledger: dict[str, list[LedgerRecord]] = {user_id: [] for user_id in named}
    for row in await driver.fetch(READ_LEDGER.sql, named):
        ledger[row[0]].append(LedgerRecord(*row))
    keys: dict[str, list[KeyRecord]] = {user_id: [] for user_id in named}
    for user_id, key, created_at, operation, request in await driver.fetch(READ_KEYS.sql, named):
        keys[user_id].append(KeyRecord(user_id, key, created_at, Claim(operation, request)))
    consents = {
        row[0]: UserConsent.model_validate(dict(row))
        for row in await driver.fetch(READ_CONSENTS.sql, named)
    }
    events: dict[str, list[ConsentEvent]] = {user_id: [] for user_id in named}
    for row in await driver.fetch(READ_EVENTS.sql, named):
        events[row[0]].append(
            ConsentEvent(
                terms_accepted=row[1],
                marketing_consent=row[2],
                terms_version=row[3],
                recorded_at=row[4],
            )
        )
    recorded_as = pseudonym_of(pseudonyms, named)
    recorded = {}
    if recorded_as:
        recorded = {
            row[0]: _erasure(row)
            for row in await driver.fetch(READ_ERASURES.sql, list(recorded_as.values()))
        }
    return [
        UserState(
            user_id,
            accounts.get(user_id),
            tuple(ledger[user_id]),
            consents.get(user_id),
            tuple(keys[user_id]),
            tuple(events[user_id]),
            recorded.get(recorded_as.get(user_id, "")),
        )
        for user_id in named
    ]


async def _copied(
    driver: asyncpg.Connection,
    batch: StagedBatch,
    staged: StagedRows,
    pseudonyms: Pseudonyms | None,
) -> Merged | None:
    """COPY of a batch whose users the store holds nothing of, verified; None, with
    nothing copied, when it holds something of them or erased one of them.

    Whether the store held something of them is left to the tables' keys (an account, a
    claimed key or a consent already held fails its COPY as a unique violation) and, for
    ledger rows and events, which have none, to the copy's VERIFY (COPIED_HELD: more rows
    than came); either way the copy is undone and the batch merged as any other. Each
    table's rows go in key order, as the merge's do, so that two merges of the same users
    wait for each other, not deadlock."""
    accounts, ledger, consents, keys, events = staged
    recorded_as = [
        pseudonym
        for user_id, pseudonym in pseudonym_of(pseudonyms, batch.user_ids).items()
        if not is_pseudonym(user_id)
    ]
    if recorded_as and await driver.fetchval(ANY_ERASED.sql, recorded_as):
        return None
    claims = _claims(ledger, keys, from_rows=not batch.keys)
    copy = driver.transaction()  # a savepoint: what the store held undoes only the copy
    await copy.start()
    try:
        await _copy(driver, COPY_ACCOUNTS, sorted((*row, row[4], row[4]) for row in accounts))
        if ledger:
            await _copy(driver, COPY_LEDGER, ledger)
        if claims:
            await _copy(driver, COPY_KEYS, claims)
        if consents:
            await _copy(driver, COPY_CONSENTS, sorted(consents))
        if events:
            await _copy(driver, COPY_EVENTS, events)
        held = await driver.fetch(
            COPIED_HELD.sql, [row[0] for row in accounts], [row[0] for row in consents]
        )
    except asyncpg.UniqueViolationError:
        await copy.rollback()
        return None
    differing = _copied_differing(staged, claims, held)
    if any(differing.values()):
        await copy.rollback()
        return None
    await copy.commit()
    merged = _copy_merged(len(ledger))
    if not differing:
        return merged
    incoming = [state for state in states_of(batch, staged) if state.user_id in differing]
    kept = await _read(driver, [state.user_id for state in incoming], pseudonyms)
    return Merged(merged.tally, verified(incoming, kept))


async def _write(driver: asyncpg.Connection, plans: Sequence[Plan], held: set[str]) -> None:
    """The batch's plans written as they are (as app/repositories/sql/state.py's `_write`
    writes each), a table at a time; an account that appeared since the plans' read raises
    MergeRaced, so that the merge decides again."""
    updated = [
        (plan.user_id, *_account_values(plan.account))
        for plan in plans
        if plan.account is not None and plan.user_id in held
    ]
    if updated:
        await driver.executemany(UPDATE_ACCOUNT.sql, updated)
    created = [plan.account for plan in plans if plan.account and plan.user_id not in held]
    if created:
        columns = list(zip(*((a.user_id, *_account_values(a)) for a in created), strict=True))
        inserted = await driver.fetch(INSERT_ACCOUNTS.sql, *map(list, columns))
        if len(inserted) < len(created):
            raise MergeRaced("an account appeared while the merge decided")
    rows = [
        (row.user_id, row.kind, row.amount, row.timestamp, row.description, row.idempotency_key)
        for plan in plans
        for row in plan.rows
    ]
    if rows:
        await _copy(driver, COPY_LEDGER, rows)
    keys = [
        (k.user_id, k.key, k.created_at, k.claim.operation, k.claim.request)
        for plan in plans
        for k in plan.keys
    ]
    if keys:
        await driver.execute(CLAIM_KEYS.sql, *map(list, zip(*keys, strict=True)))
    consents = [_consent_values(plan.consent) for plan in plans if plan.consent is not None]
    if consents:
        await driver.executemany(WRITE_CONSENT.sql, consents)
    events = [
        (
            plan.user_id,
            event.terms_accepted,
            event.marketing_consent,
            event.terms_version,
            event.recorded_at,
        )
        for plan in plans
        for event in plan.events
    ]
    if events:
        await _copy(driver, COPY_EVENTS, events)


async def _copy(driver: asyncpg.Connection, target: CopyInto, records: Sequence[Any]) -> None:
    await driver.copy_records_to_table(target.table, records=records, columns=target.columns)


def _account_values(account: Account) -> tuple[Any, ...]:
    return account.is_guest, account.available, account.maximum, account.last_reset


def _consent_values(consent: UserConsent) -> tuple[Any, ...]:
    return (
        consent.user_id,
        consent.terms_accepted,
        consent.marketing_consent,
        consent.timestamp,
        consent.updated_at,
        consent.terms_version,
    )


def _erasure(row: Any) -> Erasure:
    pseudonym, erased_at, is_guest, available, maximum, last_reset = row
    account = None
    if maximum is not None:
        account = Account(pseudonym, is_guest, available, maximum, last_reset)
    return Erasure(pseudonym, erased_at, account)


def _erasure_row(record: Erasure) -> tuple[Any, ...]:
    account = record.account
    if account is None:
        return record.pseudonym, record.erased_at, None, None, None, None
    return record.pseudonym, record.erased_at, *_account_values(account)


def _claims(ledger: list[Any], keys: list[Any], *, from_rows: bool) -> list[tuple[Any, ...]]:
    """The keys a copied batch claims, in key order: those carried with their requests,
    and, `from_rows` (claims that do not travel), every key a deduction or refund row
    carries (the one merge's KEYS), at the time of its last row, its request unknown."""
    claims = {}
    if from_rows:
        claims = {
            (row[0], row[5]): (row[0], row[5], row[3], row[1], None)
            for row in ledger
            if row[5] is not None and row[1] in KEYED_KINDS
        }
    claims.update({(row[0], row[1]): tuple(row) for row in keys})
    return sorted(claims.values(), key=itemgetter(0, 1))


def _copy_merged(rows: int) -> Merged:
    """What a copy did, as the one merge counts it (FIRST CARRY): every row applied."""
    return Merged(Tally(applied=rows, added=rows))


def _copied_differing(
    staged: StagedRows, claims: list[tuple[Any, ...]], held: list[asyncpg.Record]
) -> dict[str, bool]:
    """The users a copy left differing from their rows (COPIED_HELD), each with whether
    the store holds more ledger rows, events or keys of it than came: then it held some
    before."""
    accounts, ledger, consents, _, events = staged
    rows_of = Counter(map(itemgetter(0), ledger))
    events_of = Counter(map(itemgetter(0), events))
    keys_of = Counter(map(itemgetter(0), claims))
    total_of: dict[str, int] = {}
    for row in ledger:
        total_of[row[0]] = total_of.get(row[0], 0) + row[2]
    expected = {
        row[0]: (row[1], row[2], row[3], rows_of[row[0]], total_of.get(row[0], 0))
        for row in accounts
    }
    consented = {row[0]: row[4] for row in consents}
    differing: dict[str, bool] = {}
    for row in held:
        user_id, stands = row[0], row[6]
        more = (
            row[4] > expected[user_id][3]
            or row[7] > events_of[user_id]
            or row[8] > keys_of[user_id]
        )
        if row[1:6] != expected[user_id] or more:
            differing[user_id] = more
        elif user_id in consented and (stands is None or stands < consented[user_id]):
            differing[user_id] = False
    return differing
