"""The credit rules of SPEC §3, each stated once: pure, with no I/O and no clock.

Given an account (None on first sight), an operation and `now`, `CreditRules.apply`
returns the account after it and the ledger entries it writes, or refuses with
InsufficientCreditsError. The memory store applies it under its lock, the SQL general
path applies it to the account row it holds locked, and PostgreSQL's single
statements mirror its steady state, each naming the rule it mirrors
(app/repositories/postgres/statements.py). The rules, by the names the stores cite:

- FIRST SIGHT: an unseen account opens with the full budget of its tier, no ledger row.
- ERASED RESUMES: an id erased (SPEC §10) before its next reset was due opens as it was
  erased: its tier and reset instant, and its balance, the spent part written as one
  `deduction` row, so erasure is no way to a fresh budget and the ledger still sums.
- DUE RESET: when `now >= last_reset + period`, any access first refills to the maximum
  and restarts the period, with one `reset` row of the refill (none if nothing moved).
- DEDUCT: only a balance that covers the amount; otherwise a refusal that changes nothing.
- REFUND: credits at most up to the maximum; the row records what was credited.
- UPGRADE: a guest becomes registered, the balance grows by the difference of the maxima.
- RESET: back to the maximum now, the period restarts.
- REPEATED KEY: a change whose idempotency key was already applied changes nothing
  but the due reset, and answers with the account.
- REUSED KEY: a key keeps what its first use asked for (its Claim: the operation, a
  digest of amount and description); a repeat asking for anything else is refused and
  changes nothing.
- LEDGER: every balance change is one row of its amount, never a row of 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import assert_never

from app.errors import IdempotencyKeyReusedError, InsufficientCreditsError
from app.schemas import TransactionType, UserCredits

RESET_NOTE = "credits reset"
UPGRADE_NOTE = "upgraded to registered"
CARRIED_NOTE = "spent before erasure"


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    is_guest: bool
    available: int
    maximum: int
    last_reset: datetime


@dataclass(frozen=True, slots=True)
class Entry:
    """A ledger row to write, at the operation's `now`."""

    kind: TransactionType
    amount: int
    description: str | None


@dataclass(frozen=True, slots=True)
class Read:
    """An access that changes nothing but FIRST SIGHT and DUE RESET."""

    is_guest: bool = True  # the tier an unseen account opens with


@dataclass(frozen=True, slots=True)
class Deduct:
    amount: int
    is_guest: bool = True
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Refund:
    amount: int
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Upgrade:
    pass


@dataclass(frozen=True, slots=True)
class Reset:
    pass


Change = Deduct | Refund | Upgrade | Reset
Operation = Read | Change
Keyed = Deduct | Refund  # the changes a client may send an idempotency key with
KEYED_KINDS = ("deduction", "refund")  # their ledger types


def operation_name(kind: type[Operation]) -> str:
    """How logs and metrics name an operation: its type's (`Deduct` → "deduct"), so an
    operation added here is named without a list kept elsewhere."""
    return kind.__name__.lower()


@dataclass(frozen=True, slots=True)
class Claim:
    """REUSED KEY: what a key's first use asked for. `operation`: the ledger type of the
    change ("deduction", "refund"). `request`: a digest of its amount and description;
    None where that is not known (a key kept from before it was recorded, or carried
    from another store's ledger, whose row holds what was credited, not what was asked),
    and any repeat of the operation then counts as the same request."""

    operation: str
    request: str | None

    @classmethod
    def of(cls, change: Keyed) -> Claim:
        operation = KEYED_KINDS[0] if isinstance(change, Deduct) else KEYED_KINDS[1]
        # JSON keeps a description of "null" apart from none at all.
        request = json.dumps([change.amount, change.description]).encode()
        return cls(operation, hashlib.sha256(request).hexdigest())

    def admits(self, change: Keyed) -> bool:
        """Is `change` the request this key was first used for?"""
        asked = Claim.of(change)
        return self.operation == asked.operation and self.request in (None, asked.request)


@dataclass(slots=True)
class Attempt:
    """One call of a credit operation as the service made it: its instant and the key it
    is known by. Every retry and every replay sends the same attempt, so a store that
    lost an answer finds out whether the call was applied.

    `own_key`: the service made the key for this call alone, the client having sent
    none; nothing else can ever send it. `sent`: a statement carrying the key has gone
    to a database, so an earlier attempt may have been applied though its answer was lost.
    """

    at: datetime
    key: str | None = None
    own_key: bool = False
    sent: bool = False
    # Set by the first store to decide the call (the primary, before any shadow): was its
    # key applied before? A retry after a commit whose answer was lost finds it applied.
    replayed: bool | None = None

    def decided(self, replayed: bool) -> None:
        if self.replayed is None:
            self.replayed = replayed


@dataclass(frozen=True, slots=True)
class Outcome:
    account: Account
    entries: tuple[Entry, ...] = ()
    settled: int = 0  # how many leading entries are a due reset's; the rest are the operation's

    def keyed(self, entry_index: int) -> bool:
        """Is this entry the operation's own (the one its idempotency key goes with)?"""
        return entry_index >= self.settled


@dataclass(frozen=True)
class CreditRules:
    """Budgets and refill period (SPEC §5), and every rule that uses them."""

    guest_max: int
    registered_max: int
    reset_period: timedelta

    def full(self, is_guest: bool) -> int:
        return self.guest_max if is_guest else self.registered_max

    def reset_cutoff(self, now: datetime) -> datetime:
        """DUE RESET: due when `last_reset <= cutoff`."""
        return now - self.reset_period

    def opened(self, user_id: str, is_guest: bool, now: datetime) -> Account:
        """FIRST SIGHT."""
        full = self.full(is_guest)
        return Account(user_id, is_guest, full, full, now)

    def apply(
        self,
        account: Account | None,
        user_id: str,
        operation: Operation,
        now: datetime,
        *,
        claimed: Claim | None = None,
        erased: Account | None = None,
    ) -> Outcome:
        """The account after `operation` and the ledger entries it writes, FIRST SIGHT
        and DUE RESET first. `claimed`: the claim of the operation's key, applied before
        (REPEATED KEY). `erased`: for an unseen account, the account its id had when it
        was erased (ERASED RESUMES). Raises IdempotencyKeyReusedError (REUSED KEY) and
        InsufficientCreditsError (DEDUCT); the caller then changes nothing."""
        if claimed is not None and not (
            isinstance(operation, Deduct | Refund) and claimed.admits(operation)
        ):
            raise IdempotencyKeyReusedError(claimed.operation)
        if account is None:
            account, settled = self._first_sight(user_id, operation, now, erased)
        elif account.last_reset <= self.reset_cutoff(now):
            account, settled = self._refilled(account, now)
        else:
            settled = ()
        if claimed is not None or isinstance(operation, Read):
            return Outcome(account, settled, len(settled))
        after = self._change(account, operation, now)
        return Outcome(after.account, settled + after.entries, len(settled))

    def _first_sight(
        self, user_id: str, operation: Operation, now: datetime, erased: Account | None
    ) -> tuple[Account, tuple[Entry, ...]]:
        """FIRST SIGHT, or ERASED RESUMES while the erased account's reset is not due
        (once it is, a fresh budget is what the reset would give anyway)."""
        if erased is None or erased.last_reset <= self.reset_cutoff(now):
            return self.opened(user_id, _opening_tier(operation), now), ()
        account = Account(
            user_id, erased.is_guest, erased.available, erased.maximum, erased.last_reset
        )
        return account, _entry("deduction", erased.available - erased.maximum, CARRIED_NOTE)

    def _change(self, account: Account, change: Change, now: datetime) -> Outcome:
        match change:
            case Deduct():
                return self._deducted(account, change)
            case Refund():
                return self._refunded(account, change)
            case Upgrade():
                return self._upgraded(account)
            case Reset():
                return Outcome(*self._refilled(account, now))
            case _:
                assert_never(change)

    @staticmethod
    def _deducted(account: Account, deduct: Deduct) -> Outcome:
        """DEDUCT."""
        if account.available < deduct.amount:
            raise InsufficientCreditsError(account.user_id, account.available, deduct.amount)
        after = _with(account, available=account.available - deduct.amount)
        return Outcome(after, _entry("deduction", -deduct.amount, deduct.description))

    @staticmethod
    def _refunded(account: Account, refund: Refund) -> Outcome:
        """REFUND: capped at the maximum."""
        credited = min(refund.amount, account.maximum - account.available)
        after = _with(account, available=account.available + credited)
        return Outcome(after, _entry("refund", credited, refund.description))

    def _upgraded(self, account: Account) -> Outcome:
        """UPGRADE: a registered account is left as it is."""
        if not account.is_guest:
            return Outcome(account)
        balance = upgraded_balance(account.available, account.maximum, self.registered_max)
        after = Account(account.user_id, False, balance, self.registered_max, account.last_reset)
        return Outcome(after, _entry("upgrade", balance - account.available, UPGRADE_NOTE))

    @staticmethod
    def _refilled(account: Account, now: datetime) -> tuple[Account, tuple[Entry, ...]]:
        """RESET, and DUE RESET."""
        after = Account(account.user_id, account.is_guest, account.maximum, account.maximum, now)
        return after, _entry("reset", account.maximum - account.available, RESET_NOTE)

    def view(self, account: Account) -> UserCredits:
        return self.credits(
            account.user_id,
            account.is_guest,
            account.available,
            account.maximum,
            account.last_reset,
        )

    def credits(
        self, user_id: str, is_guest: bool, available: int, maximum: int, last_reset: datetime
    ) -> UserCredits:
        """The account as the service shows it (SPEC §2). Built without validation
        (pydantic's `model_construct`): every value comes typed from the rules or from the
        database's typed columns, and validating them again costs every credit call."""
        return UserCredits.model_construct(
            user_id=user_id,
            is_guest=is_guest,
            available_credits=available,
            max_credits=maximum,
            last_reset_timestamp=last_reset,
            next_reset_at=last_reset + self.reset_period,
        )


def upgraded_balance(available: int, old_max: int, registered_max: int) -> int:
    """UPGRADE: the balance grows by the difference of the maxima, within [0, registered_max]."""
    return max(0, min(available + registered_max - old_max, registered_max))


def _opening_tier(operation: Operation) -> bool:
    """FIRST SIGHT: reads and deductions name the tier; other changes open a guest."""
    return operation.is_guest if isinstance(operation, Read | Deduct) else True


def _with(account: Account, *, available: int) -> Account:
    return Account(
        account.user_id, account.is_guest, available, account.maximum, account.last_reset
    )


def _entry(kind: TransactionType, amount: int, description: str | None) -> tuple[Entry, ...]:
    """LEDGER: one row per balance change, none when nothing moved."""
    return (Entry(kind, amount, description),) if amount else ()
