"""The changes a user makes to their consent (SPEC §3), as values: every store and every
wrapper takes them through one `ConsentRepository.apply`, as credit operations go through
`CreditRepository.apply` (app/domain/credits.py)."""

from __future__ import annotations

from dataclasses import dataclass


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
