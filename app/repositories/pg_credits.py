"""PostgreSQL's fast paths for credit accounts: one statement, one round trip.

In the steady state (the account exists, no reset is due, the change fits) each
operation is a single statement whose data-modifying CTEs change the balance,
claim the idempotency key and write the ledger row together, run in autocommit:
a single statement is atomic without BEGIN/COMMIT round trips. Whenever a fast
path finds nothing to do it changes nothing, and the general transactional path
of SqlCreditRepository takes over (first sight of a reset, a short balance, a
repeated key), so correctness never rests on the fast path.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import TextualSelect, bindparam, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.models import UTCDateTime
from app.repositories.base import CreditPolicy
from app.repositories.sql_base import DEFAULT_BATCH
from app.repositories.sql_credits import ACCOUNT, Account, SqlCreditRepository, accounts
from app.resilience import sqlstate
from app.schemas import UserCredits

UNIQUE_VIOLATION = "23505"
_RETURNING = "user_id, is_guest, available_credits, max_credits, last_reset_timestamp"


def _statement(sql: str) -> TextualSelect:
    timestamps = [name for name in ("now", "reset_cutoff") if f":{name}" in sql]
    typed = [bindparam(name, type_=UTCDateTime) for name in timestamps]
    return text(sql).bindparams(*typed).columns(*ACCOUNT)


def _claim_and_record(kind: str, signed_amount: str, source: str) -> str:
    """CTEs claiming the key and writing the ledger row for each row of `source`.
    The claim has no ON CONFLICT: a key claimed meanwhile aborts the whole statement."""
    return f"""
, claim AS (
    INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at)
    SELECT user_id, CAST(:key AS VARCHAR), CAST(:now AS TIMESTAMPTZ) FROM {source}
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp, description)
    SELECT user_id, '{kind}', {signed_amount}, CAST(:now AS TIMESTAMPTZ), CAST(:description AS TEXT)
      FROM {source}
)
SELECT {_RETURNING} FROM {source}"""


_NOT_CLAIMED = """NOT EXISTS (
           SELECT 1 FROM credit_idempotency_keys
            WHERE user_id = :user_id AND idempotency_key = :key)"""

# An existing account, no reset due, enough credits, the key new.
DEDUCT = _statement(
    f"""
WITH changed AS (
    UPDATE user_credits
       SET available_credits = available_credits - :amount, updated_at = :now
     WHERE user_id = :user_id
       AND available_credits >= :amount
       AND last_reset_timestamp > :reset_cutoff
       AND {_NOT_CLAIMED}
 RETURNING {_RETURNING}
)"""
    + _claim_and_record("deduction", "-CAST(:amount AS INTEGER)", "changed")
)

# First sight: the account is created with the deduction already made.
CREATE_AND_DEDUCT = _statement(
    f"""
WITH changed AS (
    INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,
                              last_reset_timestamp, created_at, updated_at)
    SELECT CAST(:user_id AS VARCHAR), CAST(:is_guest AS BOOLEAN),
           CAST(:full AS INTEGER) - CAST(:amount AS INTEGER), CAST(:full AS INTEGER),
           :now, :now, :now
     WHERE CAST(:full AS INTEGER) >= CAST(:amount AS INTEGER)
        ON CONFLICT (user_id) DO NOTHING
 RETURNING {_RETURNING}
)"""
    + _claim_and_record("deduction", "-CAST(:amount AS INTEGER)", "changed")
)

# An existing account, no reset due, the whole refund fits under max_credits.
REFUND = _statement(
    f"""
WITH changed AS (
    UPDATE user_credits
       SET available_credits = available_credits + :amount, updated_at = :now
     WHERE user_id = :user_id
       AND available_credits + :amount <= max_credits
       AND last_reset_timestamp > :reset_cutoff
       AND {_NOT_CLAIMED}
 RETURNING {_RETURNING}
)"""
    + _claim_and_record("refund", "CAST(:amount AS INTEGER)", "changed")
)


class PostgresCreditRepository(SqlCreditRepository):
    """SqlCreditRepository with single-statement fast paths (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, policy: CreditPolicy, *, batch_size: int = DEFAULT_BATCH
    ) -> None:
        super().__init__(engine, policy, batch_size=batch_size)
        # Shares the pool; statements on it commit by themselves.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def get_or_create(self, user_id: str, *, is_guest: bool, now: datetime) -> UserCredits:
        account = await self._one(select(*ACCOUNT).where(accounts.c.user_id == user_id))
        if account is not None and account.last_reset_timestamp > self._policy.reset_cutoff(now):
            return self._view(account)
        return await super().get_or_create(user_id, is_guest=is_guest, now=now)

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
        if idempotency_key is not None:
            values = self._values(user_id, amount, now, description, idempotency_key)
            account = await self._one(DEDUCT, values)
            if account is None:
                full = self._policy.max_for(is_guest)
                account = await self._one(
                    CREATE_AND_DEDUCT, {**values, "is_guest": is_guest, "full": full}
                )
            if account is not None:
                return self._view(account)
        return await super().deduct(
            user_id,
            amount,
            is_guest=is_guest,
            now=now,
            description=description,
            idempotency_key=idempotency_key,
        )

    async def refund(
        self,
        user_id: str,
        amount: int,
        *,
        now: datetime,
        description: str | None,
        idempotency_key: str | None,
    ) -> UserCredits:
        if idempotency_key is not None:
            values = self._values(user_id, amount, now, description, idempotency_key)
            account = await self._one(REFUND, values)
            if account is not None:
                return self._view(account)
        return await super().refund(
            user_id, amount, now=now, description=description, idempotency_key=idempotency_key
        )

    def _reading(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self._autocommit.connect()

    def _values(
        self, user_id: str, amount: int, now: datetime, description: str | None, key: str
    ) -> dict[str, Any]:
        return {
            "user_id": user_id,
            "amount": amount,
            "now": now,
            "reset_cutoff": self._policy.reset_cutoff(now),
            "description": description,
            "key": key,
        }

    async def _one(self, statement: Any, values: dict[str, Any] | None = None) -> Account | None:
        """The statement's row, or None when it changed nothing (or lost a race on the
        idempotency key, which aborted it whole)."""
        try:
            async with self._autocommit.connect() as conn:
                return (await conn.execute(statement, values or {})).first()
        except sa_exc.IntegrityError as error:
            if sqlstate(error) == UNIQUE_VIOLATION:  # the key's primary key: claimed meanwhile
                return None
            raise
