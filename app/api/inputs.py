"""Request bodies and parameters, with the input bounds of SPEC §4."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Path, Query
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)

from app.config import StorageBackend
from app.json_documents import depth_of, storable_json

USER_ID_PATTERN = r"^[A-Za-z0-9_.:@-]+$"
MAX_CONTEXT_BYTES = 8 * 1024
MAX_CONTEXT_DEPTH = 32


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000; refuse it here rather than fail in the database.
    if "\x00" in value:
        raise ValueError("text may not contain the NUL character")
    return value


def _storable_context(value: dict[str, Any]) -> dict[str, Any]:
    if depth_of(value) > MAX_CONTEXT_DEPTH:
        raise ValueError(f"context nests deeper than {MAX_CONTEXT_DEPTH} levels")
    storable_json(value, max_bytes=MAX_CONTEXT_BYTES)
    return value


UserIdField = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=USER_ID_PATTERN)
]
UserId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        pattern=USER_ID_PATTERN,
        description="1 to 128 characters of A-Z a-z 0-9 _ . : @ -",
    ),
]
Description = Annotated[
    str | None, Field(max_length=500), AfterValidator(lambda v: v and _no_nul(v))
]
# Strict: JSON true/false or "5" are not amounts.
Amount = Annotated[int, Field(ge=1, le=1000, strict=True)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        description="Repeats of one key for one user are applied once.",
    ),
    AfterValidator(lambda v: v and _no_nul(v)),
]
HistoryLimit = Annotated[int, Query(ge=1, le=500)]


class DeductRequest(BaseModel):
    amount: Amount = 1
    description: Description = None
    is_guest: bool = True


class RefundRequest(BaseModel):
    amount: Amount
    description: Description = None


class ConsentRequest(BaseModel):
    # Consent is never implied: no default, and only JSON true or false.
    terms_accepted: StrictBool
    marketing_consent: StrictBool = False


class MarketingConsentRequest(BaseModel):
    marketing_consent: StrictBool


class AssistantQueryRequest(BaseModel):
    user_id: UserIdField
    query: Annotated[
        str,
        StringConstraints(min_length=1, max_length=2000, pattern=r"\S"),
        AfterValidator(_no_nul),
    ]
    is_guest: bool = True
    context: Annotated[dict[str, Any], AfterValidator(_storable_context)] = Field(
        default_factory=dict, description=f"JSON object, at most {MAX_CONTEXT_BYTES} bytes"
    )


class StorageRequest(BaseModel):
    backend: StorageBackend
    shadow: StorageBackend | None = Field(
        None, description="A store every write is repeated on, and reads compared with"
    )
    carry_state: StrictBool = Field(
        True,
        description="Copy the old primary's credits and consents into the new one first "
        "(or, the primary staying, the primary's into a new shadow)",
    )

    @model_validator(mode="after")
    def _shadow_is_the_other_store(self) -> StorageRequest:
        if self.shadow is self.backend:
            raise ValueError("shadow must be another store than backend")
        return self
