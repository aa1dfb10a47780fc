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
