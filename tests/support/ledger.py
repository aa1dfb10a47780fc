"""The ledger invariant of SPEC §3, checked after every credit test.

For every account: available_credits == the balance it was created with + the
sum of its ledger amounts (until retention removes rows).
"""

from __future__ import annotations

from datetime import datetime

from app.domain.credits import Attempt, CreditRules, Deduct, Operation, Read
from app.repositories.base import CreditRepository
from app.schemas import CreditTransaction, UserCredits
from app.services.credits import CreditService


class LedgerAudit:
    """Remembers each account a test touched and how it was first created."""

    def __init__(self, rules: CreditRules) -> None:
        self._rules = rules
        self._created_as_guest: dict[str, bool] = {}
        self.enabled = True

    def saw(self, user_id: str, is_guest: bool) -> None:
        self._created_as_guest.setdefault(user_id, is_guest)

    def skip(self) -> None:
        """For a test that deletes ledger rows on purpose (retention)."""
        self.enabled = False

    async def verify(self, service: CreditService) -> None:
        if not self.enabled:
            return
        for user_id, is_guest in self._created_as_guest.items():
            account = await service.get_user_credits(user_id, is_guest)
            history = await service.get_transaction_history(user_id, limit=100_000)
            created_with = self._rules.full(is_guest)
            ledger_sum = sum(row.amount for row in history)
            assert account.available_credits == created_with + ledger_sum, (
                f"ledger invariant broken for {user_id}: balance {account.available_credits}, "
                f"created with {created_with}, ledger sums to {ledger_sum}"
            )
            assert all(row.amount != 0 for row in history)


class AuditedCreditRepository:
    """Passes every call through, noting which accounts it touches."""

    def __init__(self, inner: CreditRepository, audit: LedgerAudit) -> None:
        self._inner = inner
        self._audit = audit

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        is_guest = operation.is_guest if isinstance(operation, Read | Deduct) else True
        self._audit.saw(user_id, is_guest)
        return await self._inner.apply(user_id, operation, attempt)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        return await self._inner.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        return await self._inner.delete_transactions_before(cutoff)
