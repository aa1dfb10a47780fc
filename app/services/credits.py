"""Credit budgets: first sight, lazy resets, deductions, refunds and the ledger."""

from __future__ import annotations

import itertools
import os
import secrets
from datetime import timedelta

from app.clock import Clock, utc_now
from app.repositories.base import CallKey, CreditPolicy, CreditRepository
from app.schemas import CreditTransaction, UserCredits


class _CallKeys:
    """Keys unique to each call, across processes and restarts: 64 random bits drawn
    once per process, then a counter. Drawing random bits for every call cost a
    twentieth of the deduction's CPU (a system call each)."""

    def __init__(self) -> None:
        self._prefix = ""
        self._counter = itertools.count()
        os.register_at_fork(after_in_child=self._forget)  # a forked worker draws its own

    def _forget(self) -> None:
        self._prefix = ""

    def __call__(self) -> CallKey:
        if not self._prefix:
            self._prefix = f"call:{secrets.token_hex(8)}:"
            self._counter = itertools.count()
        return CallKey(f"{self._prefix}{next(self._counter):x}")


_new_call_key = _CallKeys()


def _call_key(idempotency_key: str | None) -> str:
    """The client's key, or one for this call alone: a retry after a commit whose
    outcome was lost then finds the key and charges nothing twice."""
    return idempotency_key if idempotency_key is not None else _new_call_key()


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


class CreditService:
    """Every user's budget of AI queries (SPEC §3).

    Atomicity lives in the repository, which does each call as one unit of work;
    this class holds the rules that do not depend on the store.
    """

    def __init__(
        self, repository: CreditRepository, policy: CreditPolicy, *, clock: Clock = utc_now
    ) -> None:
        self._repository = repository
        self._policy = policy
        self._clock = clock

    async def get_user_credits(self, user_id: str, is_guest: bool = True) -> UserCredits:
        """The account, created with a full balance on first sight; a due reset applied first."""
        return await self._repository.get_or_create(user_id, is_guest=is_guest, now=self._clock())

    async def check_credits(self, user_id: str, required: int = 1, is_guest: bool = True) -> bool:
        _require_positive("required", required)
        account = await self.get_user_credits(user_id, is_guest)
        return account.available_credits >= required

    async def deduct_credits(
        self,
        user_id: str,
        amount: int = 1,
        *,
        is_guest: bool = True,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> UserCredits:
        """Raises InsufficientCreditsError, changing nothing, when the balance is short.

        A repeated `idempotency_key` charges nothing and returns the account as it is.
        """
        _require_positive("amount", amount)
        return await self._repository.deduct(
            user_id,
            amount,
            is_guest=is_guest,
            now=self._clock(),
            description=description,
            idempotency_key=_call_key(idempotency_key),
        )

    async def refund_credits(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> UserCredits:
        """Gives credits back, never above `max_credits`."""
        _require_positive("amount", amount)
        return await self._repository.refund(
            user_id,
            amount,
            now=self._clock(),
            description=description,
            idempotency_key=_call_key(idempotency_key),
        )

    async def upgrade_to_registered(self, user_id: str) -> UserCredits:
        """A guest becomes registered and gains the difference of the two maxima."""
        return await self._repository.upgrade(
            user_id, registered_max=self._policy.registered_max, now=self._clock()
        )

    async def reset_credits(self, user_id: str) -> UserCredits:
        """Refills to `max_credits` now and restarts the reset period."""
        return await self._repository.reset(user_id, now=self._clock())

    async def get_transaction_history(
        self, user_id: str, limit: int = 50
    ) -> list[CreditTransaction]:
        """Newest first."""
        _require_positive("limit", limit)
        return await self._repository.history(user_id, limit)

    async def cleanup_old_transactions(self, days: int = 90) -> int:
        """Deletes ledger rows older than `days`; returns how many."""
        _require_positive("days", days)
        return await self._repository.delete_transactions_before(
            self._clock() - timedelta(days=days)
        )
