"""PostgreSQL's fast path for credit accounts: one statement, one round trip.

In the steady state (the account exists, no reset is due, the balance covers the
change, the key is new) each operation is one statement of app/repositories/postgres/
statements.py, which mirrors the rules. On first sight the rules open the account
and apply the operation in Python (no row to race for yet) and one statement inserts
what they decided, unless the account appeared meanwhile. Whatever neither does is
handed to the general path (SqlCreditRepository), which applies the rules to the locked
row: correctness never rests on the fast path, which only ever declines.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from app.domain.credits import (
    RESET_NOTE,
    UPGRADE_NOTE,
    Attempt,
    Claim,
    CreditRules,
    Deduct,
    Operation,
    Read,
    Refund,
    Reset,
    Upgrade,
)
from app.domain.privacy import Pseudonyms
from app.errors import InsufficientCreditsError
from app.repositories.postgres.connections import FastConnections
from app.repositories.postgres.statements import (
    CREATE,
    DEDUCT,
    DEDUCT_OWN_KEY,
    HISTORY,
    READ,
    REFUND,
    RESET,
    UPGRADE,
    Statement,
)
from app.repositories.sql.credits import SqlCreditRepository, key_on_ledger
from app.schemas import CreditTransaction, UserCredits


class PostgresCreditRepository:
    """The fast path in front of the general path (see the module docstring)."""

    def __init__(
        self,
        general: SqlCreditRepository,
        connections: FastConnections,
        rules: CreditRules,
        pseudonyms: Pseudonyms | None = None,
    ) -> None:
        self._general = general
        self._connections = connections
        self._rules = rules
        self._pseudonyms = pseudonyms

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        row = await self._steady(user_id, operation, attempt)
        if row is None:
            row = await self._first_sight(user_id, operation, attempt)
        if row is None:
            return await self._general.apply(user_id, operation, attempt)
        attempt.decided(False)  # the fast path only ever applies a key new to the user
        # By position, in the order the statements return: a Record spread as keywords costs more.
        user, is_guest, available, maximum, last_reset = row
        return self._rules.credits(user, is_guest, available, maximum, last_reset)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        rows = await self._connections.fetch(HISTORY.sql, user_id, limit)
        if rows is None:
            return await self._general.history(user_id, limit)
        return [CreditTransaction.model_validate(dict(row)) for row in rows]

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        return await self._general.delete_transactions_before(cutoff)

    async def _steady(
        self, user_id: str, operation: Operation, attempt: Attempt
    ) -> asyncpg.Record | None:
        at, key = attempt.at, attempt.key
        cutoff = self._rules.reset_cutoff(at)
        match operation:
            case Read():
                return await self._row(READ, user_id, cutoff)
            case Deduct(amount, _, description) if key is not None:
                if not key_on_ledger(operation, attempt):
                    request = Claim.of(operation).request
                    return await self._row(
                        DEDUCT, user_id, at, cutoff, amount, description, key, request
                    )
                if attempt.sent:  # may have been applied: only the general path can tell
                    return None
                attempt.sent = True
                return await self._row(
                    DEDUCT_OWN_KEY, user_id, at, cutoff, amount, description, key
                )
            case Refund(amount, description) if key is not None:
                request = Claim.of(operation).request
                return await self._row(
                    REFUND, user_id, at, cutoff, amount, description, key, request
                )
            case Upgrade():
                registered_max = self._rules.registered_max
                return await self._row(UPGRADE, user_id, at, cutoff, registered_max, UPGRADE_NOTE)
            case Reset():
                return await self._row(RESET, user_id, at, RESET_NOTE)
        return None  # a change without a key: the general path's

    async def _first_sight(
        self, user_id: str, operation: Operation, attempt: Attempt
    ) -> asyncpg.Record | None:
        try:
            outcome = self._rules.apply(None, user_id, operation, attempt.at)
        except InsufficientCreditsError:
            return None  # refused if the account is new; the general path sees which
        account = outcome.account
        entry = outcome.entries[0] if outcome.entries else None  # one at most: none is due
        on_ledger = key_on_ledger(operation, attempt)
        if on_ledger:
            attempt.sent = True
        claim = (
            Claim.of(operation)
            if attempt.key is not None and not on_ledger and isinstance(operation, Deduct | Refund)
            else None
        )
        return await self._row(
            CREATE,
            user_id,
            attempt.at,
            account.is_guest,
            account.available,
            account.maximum,
            entry and entry.kind,
            entry and entry.amount,
            entry and entry.description,
            attempt.key,
            claim and attempt.key,
            claim and claim.operation,
            claim and claim.request,
            self._pseudonyms and self._pseudonyms.of(user_id),
            self._rules.reset_cutoff(attempt.at),
        )

    async def _row(self, statement: Statement, *values: object) -> asyncpg.Record | None:
        """The statement's row; None when it changed nothing, lost a race on the key
        (which aborts it whole), or found no connection free."""
        try:
            rows = await self._connections.fetch(statement.sql, *values)
        except asyncpg.UniqueViolationError:  # the key's primary key: claimed before
            return None
        return rows[0] if rows else None
