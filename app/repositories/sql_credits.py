"""Credit accounts and their ledger in SQL.

No balance is computed in Python and written back: every change is one
conditional UPDATE (a compare-and-swap where the new value depends on the old
one), so racing requests on any number of processes cannot overdraw, lose or
double a change. First sight is INSERT … ON CONFLICT DO NOTHING; idempotency keys
are claimed through their unique (user_id, idempotency_key) in the same transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import InsufficientCreditsError
from app.models import CreditIdempotencyKeyRow, CreditTransactionRow, UserCreditsRow, table
from app.repositories.base import (
    RESET_NOTE,
    UPGRADE_NOTE,
    CallKey,
    CreditPolicy,
    upgraded_balance,
)
from app.repositories.sql_base import DEFAULT_BATCH, delete_in_batches, insert, transaction
from app.resilience import is_retry
from app.schemas import CreditTransaction, TransactionType, UserCredits

accounts = table(UserCreditsRow)
ledger = table(CreditTransactionRow)
# A ledger entry as the service shows it: the call key is for retries only.
_ENTRY_COLUMNS = [column for column in ledger.c if column.name != "call_key"]
claimed_keys = table(CreditIdempotencyKeyRow)

ACCOUNT = (
    accounts.c.user_id,
    accounts.c.is_guest,
    accounts.c.available_credits,
    accounts.c.max_credits,
    accounts.c.last_reset_timestamp,
)
Account = Row[*tuple[Any, ...]]


class SqlCreditRepository:
    """Credit accounts on SQLite or PostgreSQL (see CreditRepository)."""

    def __init__(
        self, engine: AsyncEngine, policy: CreditPolicy, *, batch_size: int = DEFAULT_BATCH
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._batch_size = batch_size

    async def get_or_create(self, user_id: str, *, is_guest: bool, now: datetime) -> UserCredits:
        async with transaction(self._engine) as conn:
            return self._view(await self._prepare(conn, user_id, is_guest, now))

    async def deduct(
        self,
        user_id: str,
        amount: int,
        *,
        is_guest: bool,
        now: datetime,
        description: str | None,
        idempotency_key: str | None,
    ) -> UserCredits:
        async with transaction(self._engine) as conn:
            applied = await self._applied_before(conn, user_id, idempotency_key, now)
            if applied or not await self._claim(conn, user_id, idempotency_key, now):
                return self._view(await self._prepare(conn, user_id, is_guest, now))
            # Steady state in one statement: the account exists and no reset is due.
            cutoff = self._policy.reset_cutoff(now)
            row = await self._take(conn, user_id, amount, now, reset_cutoff=cutoff)
            if row is None:
                account = await self._prepare(conn, user_id, is_guest, now)
                row = await self._take(conn, user_id, amount, now, reset_cutoff=None)
                if row is None:  # rolls back the key claim with everything else
                    raise InsufficientCreditsError(user_id, account.available_credits, amount)
            await self._record(conn, user_id, "deduction", -amount, now, description)
            return self._view(row)

    async def refund(
        self,
        user_id: str,
        amount: int,
        *,
        now: datetime,
        description: str | None,
        idempotency_key: str | None,
    ) -> UserCredits:
        async with transaction(self._engine) as conn:
            account = await self._prepare(conn, user_id, True, now)
            if not await self._claim(conn, user_id, idempotency_key, now):
                return self._view(account)
            while (credited := min(amount, account.max_credits - account.available_credits)) > 0:
                changed = await self._returning(
                    conn,
                    update(accounts)
                    .where(
                        accounts.c.user_id == user_id,
                        accounts.c.available_credits <= accounts.c.max_credits - credited,
                    )
                    .values(
                        available_credits=accounts.c.available_credits + credited, updated_at=now
                    ),
                )
                if changed is not None:
                    await self._record(conn, user_id, "refund", credited, now, description)
                    return self._view(changed)
                account = await self._read(conn, user_id)
            return self._view(account)

    async def upgrade(self, user_id: str, *, registered_max: int, now: datetime) -> UserCredits:
        async with transaction(self._engine) as conn:
            account = await self._prepare(conn, user_id, True, now)
            while account.is_guest:
                balance = upgraded_balance(
                    account.available_credits, account.max_credits, registered_max
                )
                changed = await self._swap(
                    conn,
                    account,
                    is_guest=False,
                    max_credits=registered_max,
                    available_credits=balance,
                    updated_at=now,
                )
                if changed is not None:
                    delta = balance - account.available_credits
                    await self._record(conn, user_id, "upgrade", delta, now, UPGRADE_NOTE)
                    return self._view(changed)
                account = await self._read(conn, user_id)
            return self._view(account)

    async def reset(self, user_id: str, *, now: datetime) -> UserCredits:
        async with transaction(self._engine) as conn:
            account = await self._prepare(conn, user_id, True, now)
            return self._view(await self._refill(conn, account, now))

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                select(*_ENTRY_COLUMNS)
                .where(ledger.c.user_id == user_id)
                .order_by(ledger.c.timestamp.desc(), ledger.c.id.desc())
                .limit(limit)
            )
            return [CreditTransaction.model_validate(row._mapping) for row in result]

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        deleted = await delete_in_batches(
            self._engine,
            ledger,
            ledger.c.timestamp < cutoff,
            key=[ledger.c.id],
            batch_size=self._batch_size,
        )
        await delete_in_batches(
            self._engine,
            claimed_keys,
            claimed_keys.c.created_at < cutoff,
            key=[claimed_keys.c.user_id, claimed_keys.c.idempotency_key],
            batch_size=self._batch_size,
        )
        return deleted

    async def _prepare(
        self, conn: AsyncConnection, user_id: str, is_guest: bool, now: datetime
    ) -> Account:
        """The account, created on first sight, with any due reset applied."""
        account = await self._read_or_none(conn, user_id)
        if account is None:
            full = self._policy.max_for(is_guest)
            account = await self._returning(
                conn,
                insert(conn, accounts)
                .values(
                    user_id=user_id,
                    is_guest=is_guest,
                    available_credits=full,
                    max_credits=full,
                    last_reset_timestamp=now,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=[accounts.c.user_id]),
            )
            if account is None:  # a concurrent first sight created it
                account = await self._read(conn, user_id)
        if account.last_reset_timestamp <= self._policy.reset_cutoff(now):
            account = await self._refill(conn, account, now)
        return account

    async def _refill(self, conn: AsyncConnection, account: Account, now: datetime) -> Account:
        """Back to max_credits with one `reset` row; a compare-and-swap retried on conflict."""
        while True:
            changed = await self._swap(
                conn,
                account,
                available_credits=account.max_credits,
                last_reset_timestamp=now,
                updated_at=now,
            )
            if changed is not None:
                refill = account.max_credits - account.available_credits
                await self._record(conn, account.user_id, "reset", refill, now, RESET_NOTE)
                return changed
            account = await self._read(conn, account.user_id)
            if account.last_reset_timestamp >= now:  # a racing request refilled it
                return account

    async def _swap(self, conn: AsyncConnection, seen: Account, **values: Any) -> Account | None:
        """UPDATE only if the row is still as `seen`; None when another writer got there first."""
        return await self._returning(
            conn,
            update(accounts)
            .where(
                accounts.c.user_id == seen.user_id,
                accounts.c.is_guest == seen.is_guest,
                accounts.c.available_credits == seen.available_credits,
                accounts.c.max_credits == seen.max_credits,
                accounts.c.last_reset_timestamp == seen.last_reset_timestamp,
            )
            .values(**values),
        )

    async def _take(
        self,
        conn: AsyncConnection,
        user_id: str,
        amount: int,
        now: datetime,
        *,
        reset_cutoff: datetime | None,
    ) -> Account | None:
        statement = update(accounts).where(
            accounts.c.user_id == user_id, accounts.c.available_credits >= amount
        )
        if reset_cutoff is not None:
            statement = statement.where(accounts.c.last_reset_timestamp > reset_cutoff)
        return await self._returning(
            conn,
            statement.values(
                available_credits=accounts.c.available_credits - amount, updated_at=now
            ),
        )

    async def _claim(
        self, conn: AsyncConnection, user_id: str, key: str | None, now: datetime
    ) -> bool:
        """True when the key is new for this user (or absent); the claim commits with the change."""
        if key is None:
            return True
        claimed = await conn.execute(
            insert(conn, claimed_keys)
            .values(user_id=user_id, idempotency_key=key, created_at=now)
            .on_conflict_do_nothing()
            .returning(claimed_keys.c.user_id)
        )
        return claimed.first() is not None

    @staticmethod
    async def _applied_before(
        conn: AsyncConnection, user_id: str, key: str | None, now: datetime
    ) -> bool:
        """On a retry of a call with a key of its own: did an earlier attempt leave its
        ledger row (PostgreSQL's fast path records the key there, unclaimed)? The account
        row is locked first, so an attempt still running on the server commits or rolls
        back before the look. The row's timestamp is the call's: the index finds it."""
        if not isinstance(key, CallKey) or not is_retry():
            return False
        lock = select(accounts.c.user_id).where(accounts.c.user_id == user_id)
        await conn.execute(lock.with_for_update())
        found = await conn.execute(
            select(ledger.c.id)
            .where(ledger.c.user_id == user_id, ledger.c.timestamp == now)
            .where(ledger.c.call_key == key)
            .limit(1)
        )
        return found.first() is not None

    async def _record(
        self,
        conn: AsyncConnection,
        user_id: str,
        kind: TransactionType,
        amount: int,
        now: datetime,
        description: str | None,
    ) -> None:
        if amount == 0:  # nothing moved, nothing to record (the ledger never holds 0)
            return
        await conn.execute(
            ledger.insert().values(
                user_id=user_id,
                transaction_type=kind,
                amount=amount,
                timestamp=now,
                description=description,
            )
        )

    @staticmethod
    async def _returning(conn: AsyncConnection, statement: Any) -> Account | None:
        return (await conn.execute(statement.returning(*ACCOUNT))).first()

    @staticmethod
    async def _read_or_none(conn: AsyncConnection, user_id: str) -> Account | None:
        return (await conn.execute(select(*ACCOUNT).where(accounts.c.user_id == user_id))).first()

    async def _read(self, conn: AsyncConnection, user_id: str) -> Account:
        account = await self._read_or_none(conn, user_id)
        if account is None:
            raise LookupError(f"credit account {user_id!r} vanished inside its transaction")
        return account

    def _view(self, account: Account) -> UserCredits:
        return self._policy.account(**account._mapping)
