"""A user's state as a store holds it and as it moves between stores (SPEC §7), and how a
move is verified: pure.

The rule of the move itself, one for every path, is app/domain/carry.py's. Here:

- IDENTITY: a ledger row is known by everything but the holding store's own id (counted,
  so two equal rows stay two); a key by its user and text, claimed or on a row; a history
  event by everything it records.
- VERIFY: after a merge the store holds, for every user, the account the merge decided,
  every row, key and history event it decided on or found there, and that consent or a
  later one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.domain.credits import KEYED_KINDS, Account, Claim
from app.schemas import ConsentEvent, CreditTransaction, TransactionType, UserConsent


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """A ledger row with the idempotency key of the change that wrote it. `id` is the
    holding store's own and no part of the row's identity."""

    user_id: str
    kind: TransactionType
    amount: int
    timestamp: datetime
    description: str | None
    idempotency_key: str | None
    id: int = field(default=0, compare=False)

    def claim(self) -> Claim | None:
        """The claim a row's key makes where no claim travels with it: its operation, the
        request unknown (a refund's row holds what was credited, not what was asked).
        A key on another kind of row claims nothing."""
        if self.idempotency_key is None or self.kind not in KEYED_KINDS:
            return None
        return Claim(self.kind, None)

    def transaction(self) -> CreditTransaction:
        """The row as the service shows it (SPEC §2), built without validation: its values
        come typed from a store."""
        return CreditTransaction.model_construct(
            id=self.id,
            user_id=self.user_id,
            transaction_type=self.kind,
            amount=self.amount,
            timestamp=self.timestamp,
            description=self.description,
        )

    def fields(self) -> dict[str, Any]:
        """The row by the names of SPEC §7's ledger lines and the ledger table's columns."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "transaction_type": self.kind,
            "amount": self.amount,
            "timestamp": self.timestamp,
            "description": self.description,
            "idempotency_key": self.idempotency_key,
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A claimed idempotency key and what its first use asked for (REUSED KEY)."""

    user_id: str
    key: str
    created_at: datetime
    claim: Claim


@dataclass(frozen=True, slots=True)
class Erasure:
    """SPEC §10: when an id was erased, under its pseudonym, with the account it had then
    (ERASED RESUMES; None when it had only a consent)."""

    pseudonym: str
    erased_at: datetime
    account: Account | None = None


@dataclass(frozen=True, slots=True)
class UserState:
    """Everything a store holds of one user, but cached answers. `erasure`: the store's
    record of the user's erasure, if it erased them (a store without ERASURE_KEY knows of
    none)."""

    user_id: str
    account: Account | None = None
    ledger: tuple[LedgerRecord, ...] = ()
    consent: UserConsent | None = None
    keys: tuple[KeyRecord, ...] = ()
    events: tuple[ConsentEvent, ...] = ()
    erasure: Erasure | None = None

    @property
    def empty(self) -> bool:
        return not (self.account or self.ledger or self.consent or self.keys or self.events)


def missing(incoming: Iterable[Any], held: Iterable[Any]) -> list[Any]:
    """IDENTITY: the incoming items (rows, events) the holder lacks, as many times as it
    lacks them."""
    lacking = Counter(incoming)
    lacking.subtract(Counter(held))
    return list(lacking.elements())


def later_consent(incoming: UserConsent | None, held: UserConsent | None) -> UserConsent | None:
    """The consent that should stand, or None when the held one stays: the later
    `updated_at` wins, the held one on a tie."""
    if incoming is None or (held is not None and held.updated_at >= incoming.updated_at):
        return None
    return incoming


def later_erasure(incoming: Erasure, held: Erasure | None) -> Erasure | None:
    """The erasure record that should stand, or None when the held one stays."""
    if held is not None and held.erased_at >= incoming.erased_at:
        return None
    return incoming


def differences(expected: UserState, held: UserState) -> list[str]:
    """VERIFY: what the store got wrong about one user; empty when nothing."""
    found = []
    if expected.account is not None:
        account, kept = expected.account, held.account
        if kept is None:
            found.append("account missing")
        else:
            if kept.available != account.available:
                found.append(f"balance {kept.available}, expected {account.available}")
            if kept.maximum != account.maximum:
                found.append(f"maximum {kept.maximum}, expected {account.maximum}")
            if kept.is_guest != account.is_guest:
                found.append(f"tier {_tier(kept)}, expected {_tier(account)}")
    absent = missing(expected.ledger, held.ledger)
    if absent:
        found.append(
            f"{len(absent)} ledger row(s) missing: ledger sum "
            f"{_sum(expected.ledger) - _sum(absent)}, expected {_sum(expected.ledger)}"
        )
    keys = {record.key for record in held.keys}
    keys.update(row.idempotency_key for row in held.ledger if row.idempotency_key)
    lost = [record for record in expected.keys if record.key not in keys]
    if lost:
        found.append(f"{len(lost)} claimed key(s) missing")
    consent, stands = expected.consent, held.consent
    if consent is not None and stands != consent and later_consent(consent, stands) is not None:
        found.append("consent differs")
    lost_events = missing(expected.events, held.events)
    if lost_events:
        found.append(f"{len(lost_events)} consent event(s) missing")
    return found


def verified(expected: Sequence[UserState], held: Sequence[UserState]) -> dict[str, list[str]]:
    """VERIFY of a batch: the differences of each user that has any, by user."""
    by_user = {state.user_id: state for state in held}
    found: dict[str, list[str]] = {}
    for state in expected:
        wrong = differences(state, by_user.get(state.user_id, UserState(state.user_id)))
        if wrong:
            found[state.user_id] = wrong
    return found


@dataclass
class Tally:
    """What the one merge did to a batch (app/domain/carry.py): changes applied, rows
    added, deductions clamped, changes dropped for an erasure, keys in conflict."""

    applied: int = 0
    added: int = 0
    clamped: int = 0
    erased: int = 0
    conflicts: int = 0

    def add(self, other: Tally) -> None:
        self.applied += other.applied
        self.added += other.added
        self.clamped += other.clamped
        self.erased += other.erased
        self.conflicts += other.conflicts

    def body(self) -> dict[str, int]:
        """By the names the reports use."""
        return {
            "changes_applied": self.applied,
            "ledger_rows_added": self.added,
            "clamped": self.clamped,
            "erased": self.erased,
            "key_conflicts": self.conflicts,
        }


@dataclass(frozen=True, slots=True)
class Merged:
    """What a merge did: its tally, and what VERIFY found afterwards, by user (a user it
    found nothing wrong with is absent). `held`: what the merge left of each user, for a
    caller that keeps a copy (the outage snapshot); `fates`: by user, what became of each
    carried credit change and each consent change, in order (app/domain/carry.py, Fate)."""

    tally: Tally = field(default_factory=Tally)
    mismatched: dict[str, list[str]] = field(default_factory=dict)
    held: dict[str, UserState] = field(default_factory=dict, compare=False)
    fates: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict, compare=False
    )

    @property
    def added(self) -> int:
        return self.tally.added


@dataclass
class Verification:
    """VERIFY, user by user; a user verified again replaces its earlier result."""

    mismatched: dict[str, list[str]] = field(default_factory=dict)

    def record(self, user_ids: Iterable[str], mismatched: dict[str, list[str]]) -> None:
        """The differences VERIFY found for a batch of users (see Merged)."""
        for user_id in user_ids:
            found = mismatched.get(user_id)
            if found:
                self.mismatched[user_id] = found
            else:
                self.mismatched.pop(user_id, None)

    @property
    def mismatches(self) -> int:
        return len(self.mismatched)

    def samples(self, limit: int = 20) -> list[dict[str, object]]:
        return [
            {"user_id": user_id, "differences": found}
            for user_id, found in sorted(self.mismatched.items())[:limit]
        ]


def _tier(account: Account) -> str:
    return "guest" if account.is_guest else "registered"


def _sum(rows: Iterable[LedgerRecord]) -> int:
    return sum(row.amount for row in rows)
