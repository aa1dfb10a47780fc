"""Terms and marketing consent."""

from __future__ import annotations

from app.clock import Clock, utc_now
from app.errors import ConsentNotFoundError, InvalidInputError
from app.repositories.base import ConsentRepository
from app.schemas import UserConsent, UserCredits


class UserConsentService:
    """What each user agreed to (SPEC §3)."""

    def __init__(self, repository: ConsentRepository, *, clock: Clock = utc_now) -> None:
        self._repository = repository
        self._clock = clock

    async def get_consent(self, user_id: str) -> UserConsent | None:
        return await self._repository.get(user_id)

    async def record_consent(
        self, user_id: str, *, terms_accepted: bool = True, marketing_consent: bool = False
    ) -> UserConsent:
        """Creates or replaces the record; its first-recorded `timestamp` is kept."""
        return await self._repository.upsert(
            user_id,
            terms_accepted=terms_accepted,
            marketing_consent=marketing_consent,
            now=self._clock(),
        )

    async def update_marketing_consent(self, user_id: str, marketing_consent: bool) -> UserConsent:
        """Raises ConsentNotFoundError when the user has no consent recorded."""
        consent = await self._repository.set_marketing(
            user_id, marketing_consent, now=self._clock()
        )
        if consent is None:
            raise ConsentNotFoundError(user_id)
        return consent

    async def has_accepted_terms(self, user_id: str) -> bool:
        return _accepted(await self._repository.get(user_id))

    async def admission(self, user_id: str) -> tuple[bool, UserCredits | None]:
        """Whether the user accepted the terms, and their account where the store read it
        in the same round trip (else None: ask the credit service)."""
        consent, account = await self._repository.admission(user_id, now=self._clock())
        return _accepted(consent), account

    async def list_consents(self, limit: int = 100, offset: int = 0) -> list[UserConsent]:
        """Stable order by user_id."""
        if limit < 1 or offset < 0:
            raise InvalidInputError("limit must be at least 1 and offset at least 0")
        return await self._repository.page(limit, offset)


def _accepted(consent: UserConsent | None) -> bool:
    return consent is not None and consent.terms_accepted
