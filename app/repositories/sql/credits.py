"""Credit accounts and their ledger in SQL: the general path, on SQLite and PostgreSQL.

Each call is one transaction that holds the account row for its whole length
(SELECT … FOR UPDATE on PostgreSQL; on SQLite every transaction begins IMMEDIATE,
app/db/engine.py, which serialises writers), decides with the domain's rules
(app/domain/credits.py) and writes what they decided. No other writer can come between
the read and the write, so racing calls on any number of processes cannot overdraw,
lose or double a change; the concurrency tests race them on every store. First sight
is INSERT … ON CONFLICT DO NOTHING: of two racing first calls one creates the account,
the other decides again on it.

Where a key is kept (REPEATED KEY): every change's key on its ledger row
(`idempotency_key`, carried when the state moves to another store); a deduction's own key
(one the service made for the call) only there; any other key also claimed in
credit_idempotency_keys, unique per user, with what its first use asked for (REUSED KEY),
so that a change which moved nothing (a refund into a full balance) still claims its key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.domain.credits import (
    Account,
    Attempt,
    Claim,
    CreditRules,
    Deduct,
    Operation,
    Outcome,
    Refund,
)
from app.domain.privacy import Pseudonyms
from app.models import (
    CreditErasureRow,
    CreditIdempotencyKeyRow,
    CreditTransactionRow,
    UserCreditsRow,
    table,
)
from app.repositories.sql.base import DEFAULT_BATCH, delete_in_batches, insert, transaction
from app.schemas import CreditTransaction, UserCredits

accounts = table(UserCreditsRow)
ledger = table(CreditTransactionRow)
# A ledger entry as the service shows it: the key is for retries and moves only.
_ENTRY_COLUMNS = [column for column in ledger.c if column.name != "idempotency_key"]
claimed_keys = table(CreditIdempotencyKeyRow)
erasures = table(CreditErasureRow)

_ACCOUNT = (
    accounts.c.user_id,
    accounts.c.is_guest,
    accounts.c.available_credits,
    accounts.c.max_credits,
    accounts.c.last_reset_timestamp,
)


class SqlCreditRepository:
    """Credit accounts on SQLite or PostgreSQL (see CreditRepository and the module
    docstring); PostgreSQL's fast path hands it whatever it cannot do in one statement."""

    def __init__(
        self,
        engine: AsyncEngine,
        rules: CreditRules,
        *,
        batch_size: int = DEFAULT_BATCH,
        pseudonyms: Pseudonyms | None = None,
    ) -> None:
        self._engine = engine
        self._rules = rules
        self._batch_size = batch_size
        self._pseudonyms = pseudonyms

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        async with transaction(self._engine) as conn:
            while True:
                before = await self._locked(conn, user_id)
                claimed = await self._claimed(conn, user_id, operation, attempt)
                erased = None if before is not None else await self._erased(conn, user_id)
                outcome = self._rules.apply(
                    before, user_id, operation, attempt.at, claimed=claimed, erased=erased
                )
                if await self._store(conn, before, outcome.account, attempt.at):
                    break
                # A racing first sight created the account: decide again on it.
            attempt.decided(claimed is not None)
            await self._record(conn, user_id, outcome, attempt)
            if (
                attempt.key is not None
                and claimed is None
                and isinstance(operation, Deduct | Refund)
                and not key_on_ledger(operation, attempt)
            ):
                claim = Claim.of(operation)
                await conn.execute(
                    claimed_keys.insert().values(
                        user_id=user_id,
                        idempotency_key=attempt.key,
                        created_at=attempt.at,
                        operation=claim.operation,
                        request=claim.request,
                    )
                )
        return self._rules.view(outcome.account)

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

    async def _erased(self, conn: AsyncConnection, user_id: str) -> Account | None:
        """ERASED RESUMES: the account the id had when it was erased, if it was erased
        with one (a user erased with a consent alone had none)."""
        if self._pseudonyms is None:
            return None
        pseudonym = self._pseudonyms.of(user_id)
        row = (
            await conn.execute(
                select(
                    erasures.c.pseudonym,
                    erasures.c.is_guest,
                    erasures.c.available_credits,
                    erasures.c.max_credits,
                    erasures.c.last_reset_timestamp,
                ).where(erasures.c.pseudonym == pseudonym, erasures.c.max_credits.is_not(None))
            )
        ).first()
        return None if row is None else Account(*row)

    @staticmethod
    async def _locked(conn: AsyncConnection, user_id: str) -> Account | None:
        """The account row, held until the transaction ends."""
        statement = select(*_ACCOUNT).where(accounts.c.user_id == user_id).with_for_update()
        row = (await conn.execute(statement)).first()
        return None if row is None else Account(*row)

    @staticmethod
    async def _claimed(
        conn: AsyncConnection, user_id: str, operation: Operation, attempt: Attempt
    ) -> Claim | None:
        """REPEATED KEY: the claim of this attempt's key, if applied before for the user."""
        if attempt.key is None:
            return None
        if key_on_ledger(operation, attempt):
            # Only a retry of this very call can carry its own key: the look-up is for
            # attempts that went out before and may have been applied.
            if not attempt.sent:
                attempt.sent = True
                return None
            found = select(ledger.c.id).where(
                ledger.c.user_id == user_id, ledger.c.idempotency_key == attempt.key
            )
            applied = (await conn.execute(found.limit(1))).first() is not None
            return Claim("deduction", None) if applied else None
        claim = select(claimed_keys.c.operation, claimed_keys.c.request).where(
            claimed_keys.c.user_id == user_id, claimed_keys.c.idempotency_key == attempt.key
        )
        row = (await conn.execute(claim)).first()
        return None if row is None else Claim(*row)

    @staticmethod
    async def _store(
        conn: AsyncConnection, before: Account | None, after: Account, now: datetime
    ) -> bool:
        """Writes the decided account; False when a racing first sight created it first."""
        values: dict[str, Any] = {
            "is_guest": after.is_guest,
            "available_credits": after.available,
            "max_credits": after.maximum,
            "last_reset_timestamp": after.last_reset,
            "updated_at": now,
        }
        if before is None:
            created = await conn.execute(
                insert(conn, accounts)
                .values(user_id=after.user_id, created_at=now, **values)
                .on_conflict_do_nothing(index_elements=[accounts.c.user_id])
                .returning(accounts.c.user_id)
            )
            return created.first() is not None
        if after != before:
            await conn.execute(
                update(accounts).where(accounts.c.user_id == after.user_id).values(**values)
            )
        return True

    @staticmethod
    async def _record(
        conn: AsyncConnection, user_id: str, outcome: Outcome, attempt: Attempt
    ) -> None:
        """LEDGER: the rows the rules decided, at the attempt's instant, the operation's own
        with its key."""
        for index, entry in enumerate(outcome.entries):
            await conn.execute(
                ledger.insert().values(
                    user_id=user_id,
                    transaction_type=entry.kind,
                    amount=entry.amount,
                    timestamp=attempt.at,
                    description=entry.description,
                    idempotency_key=attempt.key if outcome.keyed(index) else None,
                )
            )


def key_on_ledger(operation: Operation, attempt: Attempt) -> bool:
    """A deduction's own key is kept on its ledger row (module docstring): sparing the
    claimed key's row and index entry on the hot path, the commonest change there is."""
    return attempt.own_key and isinstance(operation, Deduct)
