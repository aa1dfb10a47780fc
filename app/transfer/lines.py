"""The lines of an export stream (SPEC §7), as msgspec reads and writes them.

A stream (format 2) is a header line, the store's erasure records, then each user's lines
together (its account, its ledger rows, its claimed keys, its consent and the consent's
history; an erased user's pseudonym, its ledger rows), then a footer with the counts.
Format 1 streams, without keys, history or erasures, still import (app/transfer/imports.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from app.domain.credits import Account
from app.domain.privacy import is_pseudonym
from app.domain.state import Erasure
from app.errors import AppError
from app.models import IDEMPOTENCY_KEY_LENGTH, TERMS_VERSION_LENGTH, USER_ID_LENGTH
from app.schemas import TransactionType

FORMAT = 2
# No line of ours comes near it (a description is the longest field); it bounds what an
# import buffers.
MAX_LINE_BYTES = 1024 * 1024

# The lines are read with msgspec, not pydantic: an import validates every line of a
# stream of millions, and msgspec decodes and checks one in a quarter of the time.
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=USER_ID_LENGTH)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=IDEMPOTENCY_KEY_LENGTH)]
Version = Annotated[str, msgspec.Meta(min_length=1, max_length=TERMS_VERSION_LENGTH)]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]
Digest = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class _Line(msgspec.Struct, forbid_unknown_fields=True, tag_field="kind"):
    pass


class Header(_Line, tag="header"):
    format: Literal[1, 2]
    store: str
    exported_at: Instant


class AccountLine(_Line, tag="account"):
    user_id: UserId
    is_guest: bool
    available_credits: Annotated[int, msgspec.Meta(ge=0)]
    max_credits: Annotated[int, msgspec.Meta(gt=0)]
    last_reset_timestamp: Instant
    next_reset_at: Instant | None = None  # derived; shown, not read

    def __post_init__(self) -> None:
        if self.available_credits > self.max_credits:
            raise ValueError("available_credits exceeds max_credits")


class LedgerLine(_Line, tag="ledger"):
    id: int
    user_id: UserId
    transaction_type: TransactionType
    amount: int
    timestamp: Instant
    description: str | None = None
    idempotency_key: Key | None = None

    def __post_init__(self) -> None:
        if self.amount == 0:
            raise ValueError("a ledger row of 0 credits")


class ConsentLine(_Line, tag="consent"):
    user_id: UserId
    terms_accepted: bool
    marketing_consent: bool
    timestamp: Instant
    updated_at: Instant
    # Absent from streams written before terms were versioned (SPEC §10).
    terms_version: Version | None = None


class KeyLine(_Line, tag="key"):
    """A claimed key with what its first use asked for (format 2)."""

    user_id: UserId
    idempotency_key: Key
    operation: Literal["deduction", "refund"]
    request: Digest | None
    created_at: Instant


class ConsentEventLine(_Line, tag="consent_event"):
    """One event of a consent's history (format 2)."""

    user_id: UserId
    terms_accepted: bool
    marketing_consent: bool
    terms_version: Version | None
    recorded_at: Instant


class ErasureLine(_Line, tag="erasure"):
    """An erasure record (format 2): the account the user had then, if any."""

    pseudonym: UserId
    erased_at: Instant
    is_guest: bool | None = None
    available_credits: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_credits: Annotated[int, msgspec.Meta(gt=0)] | None = None
    last_reset_timestamp: Instant | None = None

    def __post_init__(self) -> None:
        if not is_pseudonym(self.pseudonym):
            raise ValueError("an erasure's pseudonym is not one")
        fields = (self.is_guest, self.available_credits, self.max_credits)
        known = [value is not None for value in (*fields, self.last_reset_timestamp)]
        if any(known) and not all(known):
            raise ValueError("an erasure's account is given in part")

    def record(self) -> Erasure:
        account = None
        if self.max_credits is not None:
            assert self.is_guest is not None and self.available_credits is not None
            assert self.last_reset_timestamp is not None
            account = Account(
                self.pseudonym,
                self.is_guest,
                self.available_credits,
                self.max_credits,
                self.last_reset_timestamp,
            )
        return Erasure(self.pseudonym, self.erased_at, account)


Count = Annotated[int, msgspec.Meta(ge=0)]


class Footer(_Line, tag="footer"):
    accounts: Count
    ledger_rows: Count
    consents: Count
    keys: Count = 0  # format 2's, from here
    consent_events: Count = 0
    erasures: Count = 0


DECODER = msgspec.json.Decoder(
    Header
    | AccountLine
    | LedgerLine
    | ConsentLine
    | KeyLine
    | ConsentEventLine
    | ErasureLine
    | Footer
)
FORMAT_2_LINES = (KeyLine, ConsentEventLine, ErasureLine)
# The lines only a user's own id may hold: a pseudonym holds ledger rows alone.
USERS_OWN = (AccountLine, ConsentLine, KeyLine, ConsentEventLine)
# And an export's lines written by msgspec, a batch of users' lines in one call: a twentieth of
# the json module's time. Its timestamps are RFC 3339, UTC written `Z`, as the API's are.
ENCODER = msgspec.json.Encoder()


class InvalidStreamError(AppError):
    status_code = 422
    code = "invalid_stream"

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}; nothing was imported")
        self.line = line

    @property
    def details(self) -> Any:
        return {"line": self.line}
