"""Every credit call counted by operation and outcome (`credit_operations_total`), in
the one place all of them pass: the repository under every CreditService."""

from __future__ import annotations

from datetime import datetime

from app.domain.credits import Attempt, Operation
from app.ops.metrics import CreditOutcomes
from app.repositories.base import CreditRepository
from app.schemas import CreditTransaction, UserCredits


class MeteredCredits:
    """A CreditRepository counting each `apply` of `credits` in `outcomes`."""

    def __init__(self, credits: CreditRepository, outcomes: CreditOutcomes) -> None:
        self._credits = credits
        self._outcomes = outcomes

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        try:
            account = await self._credits.apply(user_id, operation, attempt)
        except Exception as error:
            self._outcomes.count(operation, error)
            raise
        self._outcomes.count(operation)
        return account

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        return await self._credits.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        return await self._credits.delete_transactions_before(cutoff)
