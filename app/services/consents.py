"""Terms and marketing consent, with the version of the terms accepted and the history of
every change (SPEC §3, §10)."""

from __future__ import annotations

from app.clock import Clock, utc_now
from app.config import DEFAULT_TERMS_VERSION
from app.domain.consents import ChangeMarketing, ConsentChange, RecordConsent
from app.errors import (
    ConsentNotFoundError,
    ConsentRequiredError,
    InvalidInputError,
    TermsOutdatedError,
)
from app.repositories.base import ConsentRepository
from app.schemas import ConsentEvent, UserConsent, UserCredits


class UserConsentService:
    """What each user agreed to, and when. Terms accepted count only for the version in
    force, `terms_version` (TERMS_VERSION)."""

    def __init__(
        self,
        repository: ConsentRepository,
        *,
        terms_version: str = DEFAULT_TERMS_VERSION,
        clock: Clock = utc_now,
    ) -> None:
        self._repository = repository
        self._terms_version = terms_version
        self._clock = clock

    async def get_consent(self, user_id: str) -> UserConsent | None:
        return await self._repository.get(user_id)

    async def record_consent(
        self, user_id: str, *, terms_accepted: bool = True, marketing_consent: bool = False
    ) -> UserConsent:
        """Creates or replaces the record (its first-recorded `timestamp` kept); accepted
        terms are the version in force."""
        version = self._terms_version if terms_accepted else None
        return await self._applied(
            user_id, RecordConsent(terms_accepted, marketing_consent, version)
        )

    async def update_marketing_consent(self, user_id: str, marketing_consent: bool) -> UserConsent:
        """Raises ConsentNotFoundError when the user has no consent recorded."""
        return await self._applied(user_id, ChangeMarketing(marketing_consent))

    async def consent_history(self, user_id: str) -> list[ConsentEvent]:
        """Every change of the user's consent, newest first. Raises ConsentNotFoundError
        when there is none."""
        events = await self._repository.history(user_id)
        if not events:
            raise ConsentNotFoundError(user_id)
        return events

    async def has_accepted_terms(self, user_id: str) -> bool:
        """True only for the terms in force."""
        consent = await self._repository.get(user_id)
        return consent is not None and self._current(consent)

    async def admit(self, user_id: str) -> UserCredits | None:
        """The assistant's gate: raises ConsentRequiredError without accepted terms,
        TermsOutdatedError when the user accepted an earlier version. Answers the account
        where the store read it in the same round trip (else None: ask the credit service)."""
        consent, account = await self._repository.admission(user_id, now=self._clock())
        if consent is None or not consent.terms_accepted:
            raise ConsentRequiredError(user_id)
        if not self._current(consent):
            raise TermsOutdatedError(user_id, self._terms_version)
        return account

    async def list_consents(self, limit: int = 100, offset: int = 0) -> list[UserConsent]:
        """Stable order by user_id."""
        if limit < 1 or offset < 0:
            raise InvalidInputError("limit must be at least 1 and offset at least 0")
        return await self._repository.page(limit, offset)

    async def _applied(self, user_id: str, change: ConsentChange) -> UserConsent:
        consent = await self._repository.apply(user_id, change, now=self._clock())
        if consent is None:  # only a change of marketing alone, with no consent to change
            raise ConsentNotFoundError(user_id)
        return consent

    def _current(self, consent: UserConsent) -> bool:
        return consent.terms_accepted and consent.terms_version == self._terms_version
