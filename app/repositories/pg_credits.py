"""PostgreSQL's fast paths for credit accounts: one statement, one round trip.

In the steady state (the account exists, no reset is due) each operation is a
single statement whose data-modifying CTEs change the balance, claim the
idempotency key (or, for a key made for the call, record it on the ledger row) and
write the ledger row together, run in autocommit on the driver
(app/repositories/pg_driver.py): a single statement is atomic without BEGIN/COMMIT
round trips. First sight is one more statement that creates the
account with the operation already applied. Whenever a fast path finds nothing
to do it changes nothing, and the general transactional path of
SqlCreditRepository takes over (a reset due, a short balance, a repeated key, a
lost race on first sight), so correctness never rests on the fast path.

Where a statement needs the balance from before its own change (a refund clamped
to the maximum, an upgrade, a reset: the ledger records the difference), a first
CTE reads the row FOR UPDATE, so no other writer can come between that read and
the UPDATE joined to it.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.repositories.base import (
    RESET_NOTE,
    UPGRADE_NOTE,
    CallKey,
    CreditPolicy,
    upgraded_balance,
)
from app.repositories.pg_driver import DriverStatements
from app.repositories.sql_base import DEFAULT_BATCH
from app.repositories.sql_credits import SqlCreditRepository
from app.resilience import is_retry
from app.schemas import CreditTransaction, UserCredits

_COLUMNS = ("user_id", "is_guest", "available_credits", "max_credits", "last_reset_timestamp")
_ACCOUNT = ", ".join(_COLUMNS)


def _of(alias: str) -> str:
    return ", ".join(f"{alias}.{name}" for name in _COLUMNS)


def _claim(key: str, now: str) -> str:
    """A CTE claiming the key for the changed row. No ON CONFLICT: a key claimed by a
    concurrent call aborts the whole statement, which then changed nothing."""
    return f"""
, claim AS (
    INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at)
    SELECT user_id, {key}::varchar, {now}::timestamptz FROM changed
)"""


def _entry(kind: str, amount: str, now: str, description: str, call_key: str = "NULL") -> str:
    """A CTE writing the changed row's ledger entry; none when nothing moved."""
    return f"""
, entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp, description,
                                     call_key)
    SELECT user_id, '{kind}', {amount}, {now}::timestamptz, {description}::text,
           {call_key}::varchar
      FROM changed WHERE {amount} <> 0
)"""


def _not_claimed(user: str, key: str) -> str:
    return f"""NOT EXISTS (
           SELECT 1 FROM credit_idempotency_keys
            WHERE user_id = {user} AND idempotency_key = {key})"""


def _create(is_guest: str, available: str, full: str, now: str, when: str = "true") -> str:
    """A CTE creating the account ($1) unless it exists."""
    return f"""
WITH changed AS (
    INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,
                              last_reset_timestamp, created_at, updated_at)
    SELECT $1::varchar, ({is_guest})::boolean, ({available})::integer, ({full})::integer,
           ({now})::timestamptz, ({now})::timestamptz, ({now})::timestamptz
     WHERE {when}
        ON CONFLICT (user_id) DO NOTHING
 RETURNING {_ACCOUNT}
)"""


def _changing_locked(condition: str, assignments: str, *, only_if: str = "true") -> str:
    """CTEs `before` (the row FOR UPDATE) and `changed` (the row after the UPDATE, with
    `delta`, the change of its balance); `only_if` may still leave the row unchanged."""
    return f"""
WITH before AS (
    SELECT user_id, available_credits FROM user_credits
     WHERE user_id = $1 AND {condition}
       FOR UPDATE
), changed AS (
    UPDATE user_credits AS a SET {assignments}
      FROM before AS b
     WHERE a.user_id = b.user_id AND {only_if}
 RETURNING {_of("a")}, a.available_credits - b.available_credits AS delta
)"""


_RESULT = f"\nSELECT {_ACCOUNT} FROM changed"

# $1 user_id, $2 reset cutoff
READ = f"SELECT {_ACCOUNT} FROM user_credits WHERE user_id = $1 AND last_reset_timestamp > $2"

# $1 user_id, $2 is_guest, $3 full balance, $4 now
CREATE = _create("$2", "$3", "$3", "$4") + _RESULT

_TAKE = f"""
WITH changed AS (
    UPDATE user_credits
       SET available_credits = available_credits - $2, updated_at = $3
     WHERE user_id = $1 AND available_credits >= $2 AND last_reset_timestamp > $6
 RETURNING {_ACCOUNT}
)"""
_TAKE_ON_CREATION = _create(
    "$6", "$7::integer - $2::integer", "$7", "$3", when="$7::integer >= $2::integer"
)

# $1 user_id, $2 amount, $3 now, $4 description, $5 key, $6 reset cutoff. A repeated
# key aborts it at the claim; no NOT EXISTS probe first: repeats are rare, and the probe
# cost a tenth of the throughput (bench/).
DEDUCT = _TAKE + _claim("$5", "$3") + _entry("deduction", "-$2::integer", "$3", "$4") + _RESULT

# As DEDUCT, $6 is_guest and $7 full balance in place of the cutoff.
CREATE_AND_DEDUCT = (
    _TAKE_ON_CREATION
    + _claim("$5", "$3")
    + _entry("deduction", "-$2::integer", "$3", "$4")
    + _RESULT
)

# The first attempt of a call with a key of its own (CallKey): the key goes on the
# ledger row, unclaimed, sparing the claim's row and index entries, a sixth of the
# deduction's cost (bench/). Only a retry of the same call can repeat the key, and a
# retry takes the general path, which looks for it there (SqlCreditRepository).
DEDUCT_CALL = _TAKE + _entry("deduction", "-$2::integer", "$3", "$4", "$5") + _RESULT
CREATE_AND_DEDUCT_CALL = (
    _TAKE_ON_CREATION + _entry("deduction", "-$2::integer", "$3", "$4", "$5") + _RESULT
)

# $1 user_id, $2 amount, $3 now, $4 description, $5 key, $6 reset cutoff
REFUND = (
    _changing_locked(
        f"last_reset_timestamp > $6 AND {_not_claimed('$1', '$5')}",
        "available_credits = LEAST(a.available_credits + $2, a.max_credits), updated_at = $3",
    )
    + _claim("$5", "$3")
    + _entry("refund", "delta", "$3", "$4")
    + _RESULT
)

# $1 user_id, $2 now, $3 key, $4 guest maximum: first sight of a refund, which finds
# the new account full and credits nothing, but claims its key.
CREATE_AND_CLAIM = _create("true", "$4", "$4", "$2") + _claim("$3", "$2") + _RESULT

# $1 user_id, $2 now, $3 reset cutoff, $4 registered maximum, $5 note. A registered
# account is returned as it is.
UPGRADE = (
    _changing_locked(
        "last_reset_timestamp > $3",
        """is_guest = false, max_credits = $4, updated_at = $2,
           available_credits = GREATEST(0, LEAST(a.available_credits + $4 - a.max_credits, $4))""",
        only_if="a.is_guest",
    )
    + _entry("upgrade", "delta", "$2", "$5")
    + _RESULT
    + f"""
UNION ALL
SELECT {_ACCOUNT} FROM user_credits
 WHERE user_id = $1 AND NOT is_guest AND last_reset_timestamp > $3"""
)

# $1 user_id, $2 registered maximum, $3 now, $4 upgrade's balance change, $5 note
CREATE_UPGRADED = _create("false", "$2", "$2", "$3") + _entry("upgrade", "$4", "$3", "$5") + _RESULT

# $1 user_id, $2 now, $3 note
RESET = (
    _changing_locked(
        "true",
        "available_credits = a.max_credits, last_reset_timestamp = $2, updated_at = $2",
    )
    + _entry("reset", "delta", "$2", "$3")
    + _RESULT
)

# $1 user_id, $2 limit
HISTORY = """
SELECT id, user_id, transaction_type, amount, timestamp, description
  FROM credit_transactions WHERE user_id = $1
 ORDER BY timestamp DESC, id DESC LIMIT $2"""


def _deduction_statements(key: str | None) -> tuple[str, str] | None:
    """The fast path's two statements (steady state, first sight) for a deduction with
    this key; None where only the general path may run it: no key, or a retry of a call
    whose first attempt may have left its key on a ledger row."""
    if key is None:
        return None
    if isinstance(key, CallKey):
        return None if is_retry() else (DEDUCT_CALL, CREATE_AND_DEDUCT_CALL)
    return DEDUCT, CREATE_AND_DEDUCT


class PostgresCreditRepository(SqlCreditRepository):
    """SqlCreditRepository with single-statement fast paths (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        policy: CreditPolicy,
        driver: DriverStatements,
        *,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        super().__init__(engine, policy, batch_size=batch_size)
        self._driver = driver

    async def get_or_create(self, user_id: str, *, is_guest: bool, now: datetime) -> UserCredits:
        cutoff = self._policy.reset_cutoff(now)
        account = await self._driver.fetchrow(READ, user_id, cutoff)
        if account is None:
            full = self._policy.max_for(is_guest)
            account = await self._driver.fetchrow(CREATE, user_id, is_guest, full, now)
        if account is not None:
            return self._account(account)
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
        statements = _deduction_statements(idempotency_key)
        if statements is not None:
            take, create = statements
            values = (user_id, amount, now, description, idempotency_key)
            account = await self._changed(take, *values, self._policy.reset_cutoff(now))
            if account is None:
                full = self._policy.max_for(is_guest)
                account = await self._changed(create, *values, is_guest, full)
            if account is not None:
                return self._account(account)
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
            cutoff = self._policy.reset_cutoff(now)
            account = await self._changed(
                REFUND, user_id, amount, now, description, idempotency_key, cutoff
            )
            if account is None:
                full = self._policy.guest_max
                account = await self._changed(CREATE_AND_CLAIM, user_id, now, idempotency_key, full)
            if account is not None:
                return self._account(account)
        return await super().refund(
            user_id, amount, now=now, description=description, idempotency_key=idempotency_key
        )

    async def upgrade(self, user_id: str, *, registered_max: int, now: datetime) -> UserCredits:
        cutoff = self._policy.reset_cutoff(now)
        account = await self._driver.fetchrow(
            UPGRADE, user_id, now, cutoff, registered_max, UPGRADE_NOTE
        )
        if account is None:
            guest_max = self._policy.guest_max
            delta = upgraded_balance(guest_max, guest_max, registered_max) - guest_max
            account = await self._driver.fetchrow(
                CREATE_UPGRADED, user_id, registered_max, now, delta, UPGRADE_NOTE
            )
        if account is not None:
            return self._account(account)
        return await super().upgrade(user_id, registered_max=registered_max, now=now)

    async def reset(self, user_id: str, *, now: datetime) -> UserCredits:
        account = await self._driver.fetchrow(RESET, user_id, now, RESET_NOTE)
        if account is None:
            full = self._policy.guest_max
            account = await self._driver.fetchrow(CREATE, user_id, True, full, now)
        if account is not None:
            return self._account(account)
        return await super().reset(user_id, now=now)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        rows = await self._driver.fetch(HISTORY, user_id, limit)
        return [CreditTransaction.model_validate(dict(row)) for row in rows]

    def _account(self, row: asyncpg.Record) -> UserCredits:
        # By position (the order of _COLUMNS): a Record spread as keywords costs more.
        user_id, is_guest, available, maximum, last_reset = row
        return self._policy.account(
            user_id=user_id,
            is_guest=is_guest,
            available_credits=available,
            max_credits=maximum,
            last_reset_timestamp=last_reset,
        )

    async def _changed(self, statement: str, *values: object) -> asyncpg.Record | None:
        """The statement's row, or None when it changed nothing (or lost a race on the
        idempotency key, which aborted it whole)."""
        try:
            rows = await self._driver.fetch(statement, *values)
        except asyncpg.UniqueViolationError:  # the key's primary key: claimed meanwhile
            return None
        return rows[0] if rows else None
