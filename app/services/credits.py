"""Credit budgets: first sight, lazy resets, deductions, refunds and the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from app.clock import Clock, utc_now
from app.domain.credits import Attempt, Deduct, Keyed, Read, Refund, Reset, Upgrade
from app.errors import InvalidInputError
from app.ids import UniqueIds
from app.repositories.base import CreditRepository
from app.schemas import CreditTransaction, UserCredits

# The keys of calls sent without one: "call:" + random + counter.
_own_key = UniqueIds("call")


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise InvalidInputError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True, slots=True)
class Applied:
    """A keyed change's answer: the account, and whether the key had been applied
    before (a replay, which changed nothing)."""

    account: UserCredits
    replayed: bool


class CreditService:
    """Every user's budget of AI queries (SPEC §3).

    The rules are app/domain/credits.py's; the repository applies each call as one
    unit of work. This class checks the arguments and gives every change its attempt:
    the instant and the key a retry or a replay sends again.
    """

    def __init__(self, repository: CreditRepository, *, clock: Clock = utc_now) -> None:
        self._repository = repository
        self._clock = clock

    async def get_user_credits(self, user_id: str, is_guest: bool = True) -> UserCredits:
        """The account, created with a full balance on first sight; a due reset applied first."""
        return await self._repository.apply(user_id, Read(is_guest), Attempt(self._clock()))

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

        A repeated `idempotency_key` charges nothing and returns the account as it is;
        the key sent with another request raises IdempotencyKeyReusedError.
        """
        applied = await self.deduct(
            user_id,
            amount,
            is_guest=is_guest,
            description=description,
            idempotency_key=idempotency_key,
        )
        return applied.account

    async def deduct(
        self,
        user_id: str,
        amount: int = 1,
        *,
        is_guest: bool = True,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> Applied:
        """`deduct_credits`, saying whether the key was a replay."""
        _require_positive("amount", amount)
        return await self._keyed(user_id, Deduct(amount, is_guest, description), idempotency_key)

    async def refund_credits(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> UserCredits:
        """Gives credits back, never above `max_credits`. Keys as in `deduct_credits`."""
        applied = await self.refund(
            user_id, amount, description=description, idempotency_key=idempotency_key
        )
        return applied.account

    async def refund(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> Applied:
        """`refund_credits`, saying whether the key was a replay."""
        _require_positive("amount", amount)
        return await self._keyed(user_id, Refund(amount, description), idempotency_key)

    async def upgrade_to_registered(self, user_id: str) -> UserCredits:
        """A guest becomes registered and gains the difference of the two maxima."""
        return await self._repository.apply(user_id, Upgrade(), Attempt(self._clock()))

    async def reset_credits(self, user_id: str) -> UserCredits:
        """Refills to `max_credits` now and restarts the reset period."""
        return await self._repository.apply(user_id, Reset(), Attempt(self._clock()))

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

    async def _keyed(self, user_id: str, change: Keyed, idempotency_key: str | None) -> Applied:
        """The change under the client's key, or one for this call alone: a retry after
        a commit whose answer was lost then finds the key and charges nothing twice."""
        if idempotency_key is not None:
            attempt = Attempt(self._clock(), idempotency_key)
        else:
            attempt = Attempt(self._clock(), _own_key(), own_key=True)
        account = await self._repository.apply(user_id, change, attempt)
        return Applied(account, bool(attempt.replayed))
