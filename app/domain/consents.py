"""The changes a user makes to their consent (SPEC §3), as values: every store and every
wrapper takes them through one `ConsentRepository.apply`, as credit operations go through
`CreditRepository.apply` (app/domain/credits.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.schemas import UserConsent


@dataclass(frozen=True, slots=True)
class RecordConsent:
    """The whole record: created, or replaced keeping its first-recorded `timestamp`.
    `terms_version`: the version of the terms accepted, None when they are not."""

    terms_accepted: bool
    marketing_consent: bool
    terms_version: str | None


@dataclass(frozen=True, slots=True)
class ChangeMarketing:
    """The marketing choice alone, of a consent already recorded; nothing without one."""

    marketing_consent: bool


ConsentChange = RecordConsent | ChangeMarketing


def consent_after(
    user_id: str, current: UserConsent | None, change: ConsentChange, at: datetime
) -> UserConsent | None:
    """The user's consent once `change` is made at `at` over `current`: None where a
    marketing change has no consent to change. The memory store and the merge (LATER
    CONSENT, app/domain/carry.py) apply it; the SQL stores state it as one upsert, which
    the consent tests hold to the same answers on every store."""
    match change:
        case RecordConsent(terms_accepted, marketing_consent, terms_version):
            return UserConsent(
                user_id=user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                timestamp=current.timestamp if current else at,
                updated_at=at,
                terms_version=terms_version,
            )
        case ChangeMarketing(marketing_consent):
            if current is None:
                return None
            return current.model_copy(
                update={"marketing_consent": marketing_consent, "updated_at": at}
            )
