"""The database's credit and consent repositories with the outage fallback behind them
(app/outage/fallback.py): each call goes to the database unless its user's journaled
changes wait, and to the fallback store when the database cannot serve. What the database
answers is noted as the fallback's next starting point."""

from __future__ import annotations

from datetime import datetime

from app.domain.consents import ChangeMarketing, ConsentChange
from app.domain.credits import Attempt, Claim, Deduct, Operation, Refund
from app.errors import StorageUnavailableError
from app.outage.fallback import OutageFallback
from app.repositories.base import Stores
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits


class FallbackCredits:
    """A CreditRepository: the database, or the fallback store while it cannot serve, or
    while the user's changes wait to be replayed."""

    def __init__(self, database: Stores, fallback: OutageFallback) -> None:
        self._database = database
        self._fallback = fallback

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        fallback = self._fallback
        if fallback.waits(user_id) and await fallback.still_waits(user_id):
            return await fallback.credits(user_id, operation, attempt, fallback.waiting())
        try:
            credits = await self._database.credits.apply(user_id, operation, attempt)
        except StorageUnavailableError as unavailable:
            return await fallback.credits(user_id, operation, attempt, unavailable)
        key = attempt.key
        if key is not None and not attempt.own_key and isinstance(operation, Deduct | Refund):
            fallback.last_known.saw_key(credits, key, Claim.of(operation))
        else:
            fallback.last_known.saw_credits(credits)
        fallback.database_answered()
        return credits

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        """The database's only: the fallback store holds the outage's rows and none from
        before, and a part of the ledger would be a wrong answer (503 instead)."""
        fallback = self._fallback
        if fallback.waits(user_id) and await fallback.still_waits(user_id):
            raise fallback.waiting()
        return await self._database.credits.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        """The database's rows only: the fallback store's go with the outage."""
        return await self._database.credits.delete_transactions_before(cutoff)


class FallbackConsents:
    """A ConsentRepository: the database, or the fallback store while it cannot serve, or
    while the user's changes wait to be replayed. A consent the fallback does not know is
    503, never a refusal (SPEC §9)."""

    def __init__(self, database: Stores, fallback: OutageFallback) -> None:
        self._database = database
        self._fallback = fallback

    async def get(self, user_id: str) -> UserConsent | None:
        fallback = self._fallback
        if fallback.waits(user_id) and await fallback.still_waits(user_id):
            return fallback.consent(user_id, fallback.waiting())
        try:
            consent = await self._database.consents.get(user_id)
        except StorageUnavailableError as unavailable:
            return fallback.consent(user_id, unavailable)
        self._seen(user_id, consent)
        return consent

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        fallback = self._fallback
        if fallback.waits(user_id) and await fallback.still_waits(user_id):
            return await self._in_fallback(user_id, change, now, fallback.waiting())
        try:
            consent = await self._database.consents.apply(user_id, change, now=now)
        except StorageUnavailableError as unavailable:
            return await self._in_fallback(user_id, change, now, unavailable)
        self._seen(user_id, consent)
        return consent

    async def _in_fallback(
        self,
        user_id: str,
        change: ConsentChange,
        now: datetime,
        unavailable: StorageUnavailableError,
    ) -> UserConsent | None:
        fallback = self._fallback
        if isinstance(change, ChangeMarketing) and fallback.consent(user_id, unavailable) is None:
            return None  # known to have none: 404, as the database would answer
        return await fallback.record(user_id, change, now, unavailable)

    async def history(self, user_id: str) -> list[ConsentEvent]:
        """The database's only: the fallback store knows no history from before the
        outage, and a part of it would be a wrong answer (503 instead)."""
        fallback = self._fallback
        if fallback.waits(user_id) and await fallback.still_waits(user_id):
            raise fallback.waiting()
        return await self._database.consents.history(user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        try:
            return await self._database.consents.page(limit, offset)
        except StorageUnavailableError:
            return await self._fallback.memory.consents.page(limit, offset)

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        fallback = self._fallback
        if fallback.waits(user_id) and await fallback.still_waits(user_id):
            return fallback.consent(user_id, fallback.waiting()), None
        try:
            consent, credits = await self._database.consents.admission(user_id, now=now)
        except StorageUnavailableError as unavailable:
            return fallback.consent(user_id, unavailable), None
        self._seen(user_id, consent)
        if credits is not None:
            fallback.last_known.saw_credits(credits)
        return consent, credits

    def _seen(self, user_id: str, consent: UserConsent | None) -> None:
        self._fallback.last_known.saw_consent(user_id, consent)
        self._fallback.database_answered()


def with_fallback(database: Stores, fallback: OutageFallback) -> Stores:
    """Credits and consents fall back to memory; the cache already fails open."""
    return Stores(
        credits=FallbackCredits(database, fallback),
        consents=FallbackConsents(database, fallback),
        cache=database.cache,
    )
