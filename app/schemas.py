"""Domain objects (SPEC §2), shared by services, repositories and the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

TransactionType = Literal["deduction", "refund", "reset", "upgrade"]


class UserCredits(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: str
    is_guest: bool
    available_credits: int
    max_credits: int
    last_reset_timestamp: AwareDatetime
    next_reset_at: AwareDatetime


class CreditTransaction(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    user_id: str
    transaction_type: TransactionType
    amount: int
    timestamp: AwareDatetime
    description: str | None = None


class UserConsent(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: str
    terms_accepted: bool
    marketing_consent: bool
    timestamp: AwareDatetime
    updated_at: AwareDatetime
    # The TERMS_VERSION accepted (SPEC §10); None while the terms are not accepted.
    terms_version: str | None = None


class ConsentEvent(BaseModel):
    """One acknowledged consent change, as recorded (SPEC §10: the consent history)."""

    model_config = ConfigDict(frozen=True)

    terms_accepted: bool
    marketing_consent: bool
    terms_version: str | None
    recorded_at: AwareDatetime


class SubjectExport(BaseModel):
    """Everything held of one user (SPEC §10, GDPR Art. 15/20)."""

    user_id: str
    credits: UserCredits | None
    transactions: list[CreditTransaction]  # all, newest first
    consent: UserConsent | None
    consent_history: list[ConsentEvent]


class Erased(BaseModel):
    erased: bool
    ledger_rows_pseudonymised: int


def event_of(consent: UserConsent) -> ConsentEvent:
    """The history event of a consent as just recorded."""
    return ConsentEvent(
        terms_accepted=consent.terms_accepted,
        marketing_consent=consent.marketing_consent,
        terms_version=consent.terms_version,
        recorded_at=consent.updated_at,
    )
