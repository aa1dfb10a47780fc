"""A SQL store's users as a whole, to move them to another store (SPEC §7)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, delete, select, union, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.domain.audit import LedgerFigures
from app.domain.credits import Account
from app.domain.privacy import Pseudonyms
from app.domain.state import (
    LedgerRecord,
    Merged,
    Round,
    UserState,
    later_consent,
    lowest,
    missing_rows,
)
from app.models import HandoverMarkRow, table
from app.repositories.base import StagedBatch, StagedRows, read_back_verified, states_of
from app.repositories.sql_audit import ledger_figures
from app.repositories.sql_base import insert, snapshot, transaction
from app.repositories.sql_consents import consent_events, consents
from app.repositories.sql_credits import accounts, claimed_keys, erasures, ledger
from app.schemas import UserConsent


class SqlStateRepository:
    """Users of a SQLite or PostgreSQL store (see StateRepository). Reads see one
    snapshot (REPEATABLE READ on PostgreSQL; a SQLite read transaction is one already);
    a merge is one transaction, holding the accounts it replaces locked."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        known = union(select(accounts.c.user_id), select(consents.c.user_id)).subquery()
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

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        async with snapshot(self._engine) as conn:
            return await _read(conn, user_ids)

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        return await erase(self._engine, user_id, pseudonym, now)

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        return await ledger_figures(self._engine, after, limit)

    async def merge(self, states: Sequence[UserState], round: Round | None = None) -> int:
        if not states:
            return 0
        async with transaction(self._engine) as conn:
            user_ids = [state.user_id for state in states]
            held = {state.user_id: state for state in await _read(conn, user_ids, lock=True)}
            carried = [state.account for state in states if state.account is not None]
            if round is not None:
                carried = await _lowest_in_round(conn, round, carried)
            account_rows = [_account_row(account) for account in carried]
            if account_rows:
                await _replace(conn, accounts, account_rows, _ACCOUNT_FIELDS)
            added = [
                row
                for state in states
                for row in missing_rows(state.ledger, held[state.user_id].ledger)
            ]
            if added:
                await conn.execute(ledger.insert(), [_ledger_row(row) for row in added])
            keys = {
                (row.user_id, row.idempotency_key): (row.timestamp, claim)
                for state in states
                for row in state.ledger
                if (claim := row.claim()) is not None
            }
            if keys:
                await conn.execute(
                    insert(conn, claimed_keys).on_conflict_do_nothing(),
                    [
                        {
                            "user_id": user_id,
                            "idempotency_key": key,
                            "created_at": at,
                            "operation": claim.operation,
                            "request": claim.request,
                        }
                        for (user_id, key), (at, claim) in keys.items()
                    ],
                )
            standing = [
                consent
                for state in states
                if (consent := later_consent(state.consent, held[state.user_id].consent))
            ]
            if standing:
                rows = [consent.model_dump() for consent in standing]
                await _replace(conn, consents, rows, _CONSENT_FIELDS)
        return len(added)

    async def merge_verified(
        self, states: Sequence[UserState], round: Round | None = None
    ) -> Merged:
        """`merge`, then the users read back (committed) and compared."""
        return await read_back_verified(self, states, round)

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        return await self.merge_verified(states_of(batch, rows))


_ACCOUNT_FIELDS = (
    "is_guest",
    "available_credits",
    "max_credits",
    "last_reset_timestamp",
    "updated_at",
)
_CONSENT_FIELDS = (
    "terms_accepted",
    "marketing_consent",
    "timestamp",
    "updated_at",
    "terms_version",
)
_MARK_FIELDS = ("is_guest", "available_credits", "max_credits", "last_reset_timestamp")
marks = table(HandoverMarkRow)


async def _replace(
    conn: AsyncConnection, table: Table, rows: list[dict[str, Any]], fields: Sequence[str]
) -> None:
    """INSERT the rows, or UPDATE the `fields` of those whose user_id is there already."""
    statement = insert(conn, table)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.user_id],
            set_={name: statement.excluded[name] for name in fields},
        ),
        rows,
    )


async def _lowest_in_round(
    conn: AsyncConnection, round: Round, carried: list[Account]
) -> list[Account]:
    """LOWEST WINS: this replica's accounts marked for the round, and for each user the
    account of the lowest balance any replica marked."""
    if not carried:
        return carried
    rows = [
        {
            "round": round.number,
            "user_id": account.user_id,
            "replica": round.replica,
            "is_guest": account.is_guest,
            "available_credits": account.available,
            "max_credits": account.maximum,
            "last_reset_timestamp": account.last_reset,
        }
        for account in carried
    ]
    statement = insert(conn, marks)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[marks.c.round, marks.c.user_id, marks.c.replica],
            set_={name: statement.excluded[name] for name in _MARK_FIELDS},
        ),
        rows,
    )
    marked: dict[str, list[Account]] = {}
    for row in await conn.execute(
        select(marks).where(
            marks.c.round == round.number,
            marks.c.user_id.in_([account.user_id for account in carried]),
        )
    ):
        marked.setdefault(row.user_id, []).append(
            Account(
                row.user_id,
                row.is_guest,
                row.available_credits,
                row.max_credits,
                row.last_reset_timestamp,
            )
        )
    return [lowest(accounts) for accounts in marked.values()]


async def _read(
    conn: AsyncConnection, user_ids: Sequence[str], *, lock: bool = False
) -> list[UserState]:
    held_accounts = select(accounts).where(accounts.c.user_id.in_(user_ids))
    if lock:
        held_accounts = held_accounts.with_for_update()
    found = {
        row.user_id: Account(
            row.user_id,
            row.is_guest,
            row.available_credits,
            row.max_credits,
            row.last_reset_timestamp,
        )
        for row in await conn.execute(held_accounts)
    }
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
    consented = {
        row.user_id: UserConsent.model_validate(row._mapping)
        for row in await conn.execute(select(consents).where(consents.c.user_id.in_(user_ids)))
    }
    return [
        UserState(user_id, found.get(user_id), tuple(rows[user_id]), consented.get(user_id))
        for user_id in user_ids
    ]


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


class SqlErasures:
    """When users were erased from a SQL store (SPEC §10). The outage replay asks by id,
    so that a change journaled before the erasure (by a replica cut off from the database
    while another erased the user) does not bring the user back; the outage fallback asks
    for those erased since, to drop them from its snapshot."""

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
    holds the account row: nothing of the user is left under their id."""
    async with transaction(engine) as conn:
        columns = [accounts.c[name] for name in _MARK_FIELDS]  # the account as a mark holds it
        held = (
            await conn.execute(
                select(*columns).where(accounts.c.user_id == user_id).with_for_update()
            )
        ).first()
        if held is not None:
            record = dict(held._mapping, pseudonym=pseudonym, erased_at=now)
            statement = insert(conn, erasures).values(**record)
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[erasures.c.pseudonym],
                    set_={name: statement.excluded[name] for name in record if name != "pseudonym"},
                )
            )
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
            (marks, marks.c.user_id),
            (accounts, accounts.c.user_id),
        ):
            removed += (await conn.execute(delete(table_).where(column == user_id))).rowcount
        if not moved.rowcount and not removed:
            return None
        return moved.rowcount
