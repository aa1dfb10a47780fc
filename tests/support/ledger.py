"""The ledger invariant of SPEC §3, checked after every credit test.

For every account: available_credits == the balance it was created with + the
sum of its ledger amounts (until retention removes rows).
"""

from __future__ import annotations

from typing import Any

from app.repositories.base import CreditPolicy, CreditRepository
from app.services.credits import CreditService

_CREATES_AS_GUEST = {"refund", "upgrade", "reset"}
_TOUCHES_ACCOUNT = {"get_or_create", "deduct"} | _CREATES_AS_GUEST


class LedgerAudit:
    """Remembers each account a test touched and how it was first created."""

    def __init__(self, policy: CreditPolicy) -> None:
        self._policy = policy
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
            created_with = self._policy.max_for(is_guest)
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

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in _TOUCHES_ACCOUNT:
            return method

        async def audited(user_id: str, *args: Any, **kwargs: Any) -> Any:
            self._audit.saw(user_id, kwargs.get("is_guest", True))
            return await method(user_id, *args, **kwargs)

        return audited
