"""A user's state as it moves between stores (SPEC §7), and the rules of the move: pure.

A hand-over and an import both read users from one store and merge them into another:

- MERGE: a user present in both ends with the incoming account; ledger rows the receiving
  store lacks are added, none twice (a row is known by everything but the store's own id,
  counted, so two equal rows stay two); every key a row carries is claimed; of two
  consents the later `updated_at` wins.
- LOWEST WINS: when several replicas hand their memory over to the shared database in one
  round (a cluster-wide flag change), a user more than one of them carried ends with the
  account of the lowest balance among them, so that no replica's spending is undone.
- VERIFY: after the merge, the receiving store holds, for every user, the incoming
  balance, maximum and tier (in a round: that or a lower balance), every incoming ledger
  row (so their sum), and the incoming consent or a later one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.domain.credits import KEYED_KINDS, Account, Claim
from app.schemas import CreditTransaction, TransactionType, UserConsent


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
        """The claim a row's key makes where the row moves (MERGE): its operation, the
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
class Round:
    """One cluster-wide hand-over: the flag's version, and the replica carrying its memory."""

    number: int
    replica: str


@dataclass(frozen=True, slots=True)
class UserState:
    """Everything a store holds of one user, but cached answers."""

    user_id: str
    account: Account | None = None
    ledger: tuple[LedgerRecord, ...] = ()
    consent: UserConsent | None = None


def missing_rows(
    incoming: Iterable[LedgerRecord], held: Iterable[LedgerRecord]
) -> list[LedgerRecord]:
    """MERGE: the incoming rows the receiving store lacks, as many times as it lacks them."""
    lacking = Counter(incoming)
    lacking.subtract(Counter(held))
    return list(lacking.elements())


def later_consent(incoming: UserConsent | None, held: UserConsent | None) -> UserConsent | None:
    """MERGE: the consent that should stand, or None when the held one stays."""
    if incoming is None or (held is not None and held.updated_at >= incoming.updated_at):
        return None
    return incoming


def lowest(accounts: Iterable[Account]) -> Account:
    """LOWEST WINS."""
    return min(accounts, key=lambda account: account.available)


def differences(incoming: UserState, held: UserState, *, in_round: bool = False) -> list[str]:
    """VERIFY: what the receiving store got wrong about one user; empty when nothing.
    `in_round`: a lower balance another replica carried may stand (LOWEST WINS)."""
    found = []
    if incoming.account is not None:
        account, kept = incoming.account, held.account
        if kept is None:
            found.append("account missing")
        elif in_round and kept.available < account.available:
            pass
        else:
            if kept.available != account.available:
                found.append(f"balance {kept.available}, expected {account.available}")
            if kept.maximum != account.maximum:
                found.append(f"maximum {kept.maximum}, expected {account.maximum}")
            if kept.is_guest != account.is_guest:
                found.append(f"tier {_tier(kept)}, expected {_tier(account)}")
    absent = missing_rows(incoming.ledger, held.ledger)
    if absent:
        found.append(
            f"{len(absent)} ledger row(s) missing: ledger sum "
            f"{_sum(incoming.ledger) - _sum(absent)}, expected {_sum(incoming.ledger)}"
        )
    consent, stands = incoming.consent, held.consent
    if consent is not None and stands != consent and later_consent(consent, stands) is not None:
        found.append("consent differs")
    return found


def verified(
    incoming: Sequence[UserState], held: Sequence[UserState], *, in_round: bool = False
) -> dict[str, list[str]]:
    """VERIFY of a batch: the differences of each incoming user that has any, by user."""
    by_user = {state.user_id: state for state in held}
    found: dict[str, list[str]] = {}
    for state in incoming:
        wrong = differences(
            state, by_user.get(state.user_id, UserState(state.user_id)), in_round=in_round
        )
        if wrong:
            found[state.user_id] = wrong
    return found


@dataclass(frozen=True, slots=True)
class Merged:
    """What a merge did: the ledger rows it added, and what VERIFY found afterwards, by
    user (a user it found nothing wrong with is absent)."""

    added: int
    mismatched: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Verification:
    """VERIFY, user by user; a user verified again replaces its earlier result."""

    mismatched: dict[str, list[str]] = field(default_factory=dict)

    def record(self, user_ids: Iterable[str], mismatched: dict[str, list[str]]) -> None:
        """The differences VERIFY found for a batch of users (see Merged); a user verified
        again replaces its earlier result."""
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
