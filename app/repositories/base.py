"""The repository protocols every store implements, and the credit rules they share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from app.schemas import CreditTransaction, UserConsent, UserCredits


@dataclass(frozen=True)
class CreditPolicy:
    """Budgets and refill period, as configured (SPEC §5)."""

    guest_max: int
    registered_max: int
    reset_period: timedelta

    def max_for(self, is_guest: bool) -> int:
        return self.guest_max if is_guest else self.registered_max

    def reset_cutoff(self, now: datetime) -> datetime:
        """A reset is due when `last_reset_timestamp <= cutoff`."""
        return now - self.reset_period

    def account(
        self,
        *,
        user_id: str,
        is_guest: bool,
        available_credits: int,
        max_credits: int,
        last_reset_timestamp: datetime,
    ) -> UserCredits:
        return UserCredits(
            user_id=user_id,
            is_guest=is_guest,
            available_credits=available_credits,
            max_credits=max_credits,
            last_reset_timestamp=last_reset_timestamp,
            next_reset_at=last_reset_timestamp + self.reset_period,
        )


class CallKey(str):
    """An idempotency key the service made for one call, the client having given none.

    Nothing else can ever send it, so only a retry of that same call can repeat it:
    a store may record it more cheaply than a client's key, as long as a retry finds it
    (app/repositories/pg_credits.py)."""

    __slots__ = ()


RESET_NOTE = "credits reset"
UPGRADE_NOTE = "upgraded to registered"


def upgraded_balance(available: int, old_max: int, registered_max: int) -> int:
    """A guest's balance grows by the difference of the maxima, within [0, registered_max]."""
    return max(0, min(available + registered_max - old_max, registered_max))


class CreditRepository(Protocol):
    """Accounts and their ledger. Every method is one atomic unit of work.

    Every method that touches an account creates it on first sight (full balance)
    and applies a due reset first. Every balance change writes one ledger row in
    the same unit of work. A change carrying an idempotency key already claimed
    for that user changes nothing and returns the account as it is.
    """

    async def get_or_create(
        self, user_id: str, *, is_guest: bool, now: datetime
    ) -> UserCredits: ...

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
        """Raises InsufficientCreditsError, changing nothing, when the balance is short."""
        ...

    async def refund(
        self,
        user_id: str,
        amount: int,
        *,
        now: datetime,
        description: str | None,
        idempotency_key: str | None,
    ) -> UserCredits:
        """Credits at most up to `max_credits`; the ledger records what was credited."""
        ...

    async def upgrade(self, user_id: str, *, registered_max: int, now: datetime) -> UserCredits: ...

    async def reset(self, user_id: str, *, now: datetime) -> UserCredits: ...

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        """Newest first."""
        ...

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        """Deletes ledger rows and idempotency keys older than `cutoff`; counts the rows."""
        ...


class ConsentRepository(Protocol):
    """Consent records, one per user."""

    async def get(self, user_id: str) -> UserConsent | None: ...

    async def upsert(
        self, user_id: str, *, terms_accepted: bool, marketing_consent: bool, now: datetime
    ) -> UserConsent:
        """Creates the record, or updates it keeping its first-recorded `timestamp`."""
        ...

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        """None when no consent is recorded for the user."""
        ...

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        """Ordered by user_id."""
        ...


class CacheRepository(Protocol):
    """Cached answers by key, each with its expiry."""

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        """None when absent or expired."""
        ...

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None: ...

    async def delete_expired(self, *, now: datetime) -> int: ...

    async def clear(self) -> None: ...

    async def count(self, *, now: datetime) -> int:
        """Entries that have not expired."""
        ...


@dataclass(frozen=True)
class Stores:
    """One store's three repositories."""

    credits: CreditRepository
    consents: ConsentRepository
    cache: CacheRepository
