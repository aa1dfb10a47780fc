"""A SQL store's users as a whole, to carry them into another store (SPEC §7), through
SQLAlchemy, on SQLite and PostgreSQL. PostgreSQL's own (app/repositories/postgres/state.py)
reads and writes the same on asyncpg; a test holds the two to the same tables."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, union, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.clock import Clock, utc_now
from app.domain.audit import LedgerFigures
from app.domain.carry import Carried, Plan, carry_all, outcome
from app.domain.credits import Account, Claim, CreditRules
from app.domain.privacy import Pseudonyms
from app.domain.state import Erasure, KeyRecord, LedgerRecord, Merged, UserState, later_erasure
from app.repositories.base import StagedBatch, StagedRows, carried_batch, erase_held
from app.repositories.base import pseudonym_of as pseudonyms_of
from app.repositories.sql.audit import ledger_figures
from app.repositories.sql.base import insert, snapshot, transaction
from app.repositories.sql.consents import consent_events, consents
from app.repositories.sql.credits import accounts, claimed_keys, erasures, ledger
from app.schemas import ConsentEvent, UserConsent

# A merge decided on what it read is written only if no account appeared meanwhile (a
# racing first sight): else it is decided again, this many times at most.
MERGE_ATTEMPTS = 3


class MergeRaced(RuntimeError):
    """An account the merge found absent was created before its write: decide again."""


class SqlStateRepository:
    """Users of a SQLite or PostgreSQL store (see StateRepository). Reads see one
    snapshot (REPEATABLE READ on PostgreSQL; a SQLite read transaction is one already);
    a merge is one transaction holding the accounts it changes. `pseudonyms`: erasure
    configured; `retention`: the ledger's, for the merge's HORIZON."""

    def __init__(
        self,
        engine: AsyncEngine,
        rules: CreditRules,
        *,
        retention: timedelta,
        pseudonyms: Pseudonyms | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._rules = rules
        self._retention = retention
        self._pseudonyms = pseudonyms
        self._clock = clock

    async def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        known = union(
            select(accounts.c.user_id),
            select(consents.c.user_id),
            select(erasures.c.pseudonym.label("user_id")),
        ).subquery()
        after: str | None = None
        while True:
            page = select(known.c.user_id).order_by(known.c.user_id).limit(batch_size)
            if after is not None:
                page = page.where(known.c.user_id > after)
            async with transaction(self._engine) as conn:
                users = list((await conn.scalars(page)).all())
            if users:
                yield users
            if len(users) < batch_size:
                return
            after = users[-1]

    async def erasures(self, batch_size: int) -> AsyncIterator[list[Erasure]]:
        after: str | None = None
        while True:
            page = select(erasures).order_by(erasures.c.pseudonym).limit(batch_size)
            if after is not None:
                page = page.where(erasures.c.pseudonym > after)
            async with transaction(self._engine) as conn:
                records = [_erasure(row) for row in await conn.execute(page)]
            if records:
                yield records
            if len(records) < batch_size:
                return
            after = records[-1].pseudonym

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        async with snapshot(self._engine) as conn:
            return await self._read(conn, user_ids)

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        if not carried:
            return Merged()
        for attempt in range(MERGE_ATTEMPTS):
            try:
                async with transaction(self._engine) as conn:
                    return await self._merge(conn, carried)
            except MergeRaced:
                if attempt == MERGE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _merge(self, conn: AsyncConnection, carried: Sequence[Carried]) -> Merged:
        users = [one.user_id for one in carried]
        held = await self._read(conn, users, lock=True)
        horizon = self._clock() - self._retention
        plans = carry_all(held, carried, self._rules, horizon)
        held_accounts = {state.user_id for state in held if state.account is not None}
        for plan in plans:
            await _write(conn, plan, plan.user_id in held_accounts)
        return outcome(plans, await self._read(conn, users))

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        return await self.merge(carried_batch(batch, rows, self._pseudonyms))

    async def merge_erasures(self, records: Sequence[Erasure]) -> int:
        new: dict[str, Erasure] = {}
        async with transaction(self._engine) as conn:
            held = {
                record.pseudonym: record
                for record in map(
                    _erasure,
                    await conn.execute(
                        select(erasures).where(
                            erasures.c.pseudonym.in_([record.pseudonym for record in records])
                        )
                    ),
                )
            }
            for record in records:
                if later_erasure(record, held.get(record.pseudonym)) is not None:
                    await _record_erasure(conn, record)
                    new[record.pseudonym] = record
        return await erase_held(self, self._pseudonyms, new)

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        return await erase(self._engine, user_id, pseudonym, now)

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        return await ledger_figures(self._engine, after, limit)

    async def _read(
        self, conn: AsyncConnection, user_ids: Sequence[str], *, lock: bool = False
    ) -> list[UserState]:
        held_accounts = select(accounts).where(accounts.c.user_id.in_(user_ids))
        if lock:
            held_accounts = held_accounts.order_by(accounts.c.user_id).with_for_update()
        found = {row.user_id: _account(row) for row in await conn.execute(held_accounts)}
        rows: dict[str, list[LedgerRecord]] = {user_id: [] for user_id in user_ids}
        for row in await conn.execute(
            select(ledger).where(ledger.c.user_id.in_(user_ids)).order_by(ledger.c.id)
        ):
            rows[row.user_id].append(
                LedgerRecord(
                    row.user_id,
                    row.transaction_type,
                    row.amount,
                    row.timestamp,
                    row.description,
                    row.idempotency_key,
                    row.id,
                )
            )
        keys: dict[str, list[KeyRecord]] = {user_id: [] for user_id in user_ids}
        for row in await conn.execute(
            select(claimed_keys)
            .where(claimed_keys.c.user_id.in_(user_ids))
            .order_by(claimed_keys.c.created_at, claimed_keys.c.idempotency_key)
        ):
            keys[row.user_id].append(
                KeyRecord(
                    row.user_id,
                    row.idempotency_key,
                    row.created_at,
                    Claim(row.operation, row.request),
                )
            )
        consented = {
            row.user_id: UserConsent.model_validate(row._mapping)
            for row in await conn.execute(select(consents).where(consents.c.user_id.in_(user_ids)))
        }
        events: dict[str, list[ConsentEvent]] = {user_id: [] for user_id in user_ids}
        for row in await conn.execute(
            select(consent_events)
            .where(consent_events.c.user_id.in_(user_ids))
            .order_by(consent_events.c.recorded_at, consent_events.c.id)
        ):
            events[row.user_id].append(ConsentEvent.model_validate(row._mapping))
        pseudonym_of = pseudonyms_of(self._pseudonyms, user_ids)
        recorded = {
            row.pseudonym: _erasure(row)
            for row in await conn.execute(
                select(erasures).where(erasures.c.pseudonym.in_(list(pseudonym_of.values())))
            )
        }
        return [
            UserState(
                user_id,
                found.get(user_id),
                tuple(rows[user_id]),
                consented.get(user_id),
                tuple(keys[user_id]),
                tuple(events[user_id]),
                recorded.get(pseudonym_of.get(user_id, "")),
            )
            for user_id in user_ids
        ]


async def _write(conn: AsyncConnection, plan: Plan, account_held: bool) -> None:
    """A plan written as it is: the store decided nothing here."""
    user_id = plan.user_id
    account = plan.account
    if account is not None:
        values = _account_row(account)
        if account_held:
            del values["created_at"]
            await conn.execute(update(accounts).where(accounts.c.user_id == user_id).values(values))
        else:
            created = await conn.execute(
                insert(conn, accounts)
                .values(values)
                .on_conflict_do_nothing(index_elements=[accounts.c.user_id])
                .returning(accounts.c.user_id)
            )
            if created.first() is None:
                raise MergeRaced(user_id)
    if plan.rows:
        await conn.execute(ledger.insert(), [_ledger_row(row) for row in plan.rows])
    if plan.keys:
        await conn.execute(
            insert(conn, claimed_keys).on_conflict_do_nothing(),
            [_key_row(record) for record in plan.keys],
        )
    if plan.consent is not None:
        statement = insert(conn, consents).values(plan.consent.model_dump())
        fields = ("terms_accepted", "marketing_consent", "timestamp", "updated_at")
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[consents.c.user_id],
                set_={name: statement.excluded[name] for name in (*fields, "terms_version")},
                # LATER CONSENT, whatever was written since the plan's read.
                where=consents.c.updated_at < statement.excluded.updated_at,
            )
        )
    if plan.events:
        await conn.execute(
            consent_events.insert(),
            [{"user_id": user_id, **event.model_dump()} for event in plan.events],
        )


async def _record_erasure(conn: AsyncConnection, record: Erasure) -> None:
    """The erasure record, replacing an earlier one."""
    values = _erasure_row(record)
    statement = insert(conn, erasures).values(values)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[erasures.c.pseudonym],
            set_={name: statement.excluded[name] for name in values if name != "pseudonym"},
        )
    )


def _account(row: Any) -> Account:
    return Account(
        row.user_id, row.is_guest, row.available_credits, row.max_credits, row.last_reset_timestamp
    )


def _account_row(account: Account) -> dict[str, Any]:
    # The account's creation is not carried; its last reset is the earliest known instant.
    at: datetime = account.last_reset
    return {
        "user_id": account.user_id,
        "is_guest": account.is_guest,
        "available_credits": account.available,
        "max_credits": account.maximum,
        "last_reset_timestamp": at,
        "created_at": at,
        "updated_at": at,
    }


def _ledger_row(row: LedgerRecord) -> dict[str, Any]:
    fields = row.fields()
    del fields["id"]  # the receiving table numbers its own rows
    return fields


def _key_row(record: KeyRecord) -> dict[str, Any]:
    return {
        "user_id": record.user_id,
        "idempotency_key": record.key,
        "created_at": record.created_at,
        "operation": record.claim.operation,
        "request": record.claim.request,
    }


def _erasure(row: Any) -> Erasure:
    account = None
    if row.max_credits is not None:
        account = Account(
            row.pseudonym,
            row.is_guest,
            row.available_credits,
            row.max_credits,
            row.last_reset_timestamp,
        )
    return Erasure(row.pseudonym, row.erased_at, account)


def _erasure_row(record: Erasure) -> dict[str, Any]:
    account = record.account
    return {
        "pseudonym": record.pseudonym,
        "erased_at": record.erased_at,
        "is_guest": account and account.is_guest,
        "available_credits": account and account.available,
        "max_credits": account and account.maximum,
        "last_reset_timestamp": account and account.last_reset,
    }


class SqlErasures:
    """When users were erased from a SQL store (SPEC §10): the outage fallback asks for
    those erased since, to drop them from its snapshot, and the privacy service whether
    an id it holds nothing of was erased (a repeated erasure is not an error)."""

    def __init__(self, engine: AsyncEngine, pseudonyms: Pseudonyms) -> None:
        self._engine = engine
        self._pseudonyms = pseudonyms

    async def erased_at(self, user_id: str) -> datetime | None:
        pseudonym = self._pseudonyms.of(user_id)
        async with transaction(self._engine) as conn:
            found = select(erasures.c.erased_at).where(erasures.c.pseudonym == pseudonym)
            at: datetime | None = (await conn.execute(found)).scalar()
            return at

    async def erased_since(self, after: datetime) -> list[tuple[str, datetime]]:
        # Along the erased_at index (migration 0008).
        found = (
            select(erasures.c.pseudonym, erasures.c.erased_at)
            .where(erasures.c.erased_at > after)
            .order_by(erasures.c.erased_at)
        )
        async with transaction(self._engine) as conn:
            return [(pseudonym, at) for pseudonym, at in await conn.execute(found)]

    def pseudonym(self, user_id: str) -> str:
        return self._pseudonyms.of(user_id)


async def erase(engine: AsyncEngine, user_id: str, pseudonym: str, now: datetime) -> int | None:
    """StateRepository.erase on a SQL store (SQLite or PostgreSQL), one transaction that
    holds the account row: nothing of the user is left under their id, and the erasure is
    recorded whatever the user had (a consent alone included)."""
    async with transaction(engine) as conn:
        held = (
            await conn.execute(
                select(accounts).where(accounts.c.user_id == user_id).with_for_update()
            )
        ).first()
        moved = await conn.execute(
            update(ledger)
            .where(ledger.c.user_id == user_id)
            .values(user_id=pseudonym, description=None, idempotency_key=None)
        )
        removed = 0
        for table_, column in (
            (claimed_keys, claimed_keys.c.user_id),
            (consent_events, consent_events.c.user_id),
            (consents, consents.c.user_id),
            (accounts, accounts.c.user_id),
        ):
            removed += (await conn.execute(delete(table_).where(column == user_id))).rowcount
        if not moved.rowcount and not removed:
            # Nothing held: the erasure is recorded all the same (an earlier record keeps
            # its account), so that no carry of an earlier record takes it for news.
            statement = insert(conn, erasures).values(pseudonym=pseudonym, erased_at=now)
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[erasures.c.pseudonym],
                    set_={"erased_at": statement.excluded.erased_at},
                    where=erasures.c.erased_at < statement.excluded.erased_at,
                )
            )
            return None
        account = None if held is None else _account(held)
        kept = None if account is None else replace(account, user_id=pseudonym)
        await _record_erasure(conn, Erasure(pseudonym, now, kept))
        return moved.rowcount
