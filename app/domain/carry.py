"""The one merge (SPEC §7, revision 3): what a store writes when state is carried into it.

Every path that carries a user's state into a store goes through `carry`: a hand-over, a
replica following the flag, the shadow's repair, the outage journal's replay, an import.
It is pure: from what the store holds of the user and what is carried, the plan of what
to write; each store only applies the plan, in one unit of work that holds the user, and
VERIFY (app/domain/state.py) checks that it holds the plan's outcome. The rules, by the
names the stores cite:

- BY IDENTITY: a change is known by its idempotency key (the client's, or the one the
  service made for the call); a ledger row without a key by everything it records. Only
  the changes the store lacks are carried; a key is claimed with the request it came with.
- ERASED: nothing of a user made at or before the store's erasure of them is carried, not
  a change, a key, a consent or a history event; what came after is applied on top of the
  account the erasure left (ERASED RESUMES).
- FIRST CARRY: a user the store holds no account of takes the carried account as it is,
  with every row (a restore, a first hand-over); after an erasure, only from a source
  that knows of that erasure (or a later one), whose account then came after it.
- SAME HISTORY: a user the store holds nothing more of than is carried (no change of its
  own, no later refill, no upgrade) takes the carried account, as a single replica's
  hand-over ends with the old primary's account; the rows it lacks are added.
- ON TOP: otherwise the store made changes of its own, acknowledged writes no later carry
  may undo: each lacking change is applied by the credit rules (app/domain/credits.py) to
  the account as the store holds it, in the order the changes were made.
- CLAMP: a carried deduction that no longer fits is clamped to what is left and counted;
  its row keeps the change's key (or, for a row without one, a key made from the row), so
  that it is never carried twice.
- REFILL ONCE: a carried refill at T is applied only where the account is due at T; a store
  that refilled at T or later, or within the period before T, has it already.
- OPENING: a "spent before erasure" row is an account's opening (ERASED RESUMES), not a
  change: an account the store holds has its own.
- HORIZON: a ledger row older than the retention horizon is not carried onto an account
  the store holds: retention may have deleted it there, and its key with it. (A journaled
  change is carried whatever its age: it was never in the store but by its replay.)
- CONFLICT: a key the store holds claimed for another request (REUSED KEY) keeps its first
  use; the carried change is refused and counted.
- LATER CONSENT: of two consents the later `updated_at` wins; the history is the union of
  the events.
- BOOKS: a pseudonym's rows (SPEC §10) are the books of an erased user, not changes: the
  rows the store lacks are added as they are.

One module over the usual size: these rules decide together (ERASED before FIRST CARRY,
SAME HISTORY against ON TOP, CLAMP's key against BY IDENTITY), and a reader checks one
against another here, as the credit rules are read in app/domain/credits.py.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from app.domain.consents import ChangeMarketing, ConsentChange, RecordConsent, consent_after
from app.domain.credits import (
    CARRIED_NOTE,
    Account,
    Change,
    Claim,
    CreditRules,
    Deduct,
    Read,
    Refund,
    Reset,
    Upgrade,
)
from app.domain.privacy import is_pseudonym
from app.domain.state import (
    Erasure,
    KeyRecord,
    LedgerRecord,
    Merged,
    Tally,
    UserState,
    later_consent,
    missing,
    verified,
)
from app.errors import InsufficientCreditsError
from app.schemas import ConsentEvent, UserConsent, event_of

CLAMP_NOTE = "clamped from {required}: no longer covered when carried"
KEY_LENGTH = 128  # the key column's (app/models.py)


@dataclass(frozen=True, slots=True)
class CarriedCredit:
    """A credit change carried into a store: a journaled change as it was asked, or a
    ledger row's change as it was applied (`row`), at the instant it was made, with the
    key it is known by and, for a keyed deduction or refund, the claim of that key."""

    change: Change | Read  # Read: a refill seen as a row (DUE RESET)
    at: datetime
    key: str | None = None
    claim: Claim | None = None
    row: LedgerRecord | None = None


@dataclass(frozen=True, slots=True)
class CarriedConsent:
    """A consent change journaled during an outage (SPEC §9): a whole record, or of the
    marketing choice alone (`terms_accepted` None). `event`: the history event the change
    was acknowledged with, when the journal kept it."""

    at: datetime
    marketing_consent: bool
    terms_accepted: bool | None = None
    terms_version: str | None = None
    event: ConsentEvent | None = None

    @property
    def change(self) -> ConsentChange:
        if self.terms_accepted is None:
            return ChangeMarketing(self.marketing_consent)
        return RecordConsent(self.terms_accepted, self.marketing_consent, self.terms_version)


@dataclass(frozen=True, slots=True)
class Carried:
    """What is carried of one user: another store's state (its account, its rows as
    changes, its keys, consent and history), or journaled changes (no account). `keys`:
    every key the source claimed, with its request; None where claims do not travel (an
    outage journal, an export of format 1): then each keyed deduction or refund claims
    its key."""

    user_id: str
    account: Account | None = None
    credits: tuple[CarriedCredit, ...] = ()
    keys: tuple[KeyRecord, ...] | None = None
    consent: UserConsent | None = None
    consents: tuple[CarriedConsent, ...] = ()
    events: tuple[ConsentEvent, ...] = ()
    # The user's last erasure the source knows of: what it holds of them came after.
    erased_at: datetime | None = None


class Fate(StrEnum):
    """What became of one carried change."""

    APPLIED = "applied"
    HELD = "held"  # the store has it already (or has no use for it: REFILL ONCE, OPENING)
    CLAMPED = "clamped"
    ERASED = "erased"  # made at or before the user's erasure
    STALE = "stale"  # beyond the retention horizon
    CONFLICT = "conflict"  # its key was first used for another request


@dataclass(frozen=True, slots=True)
class Plan:
    """What a store writes for one user, and what it holds afterwards (`expected`, for
    VERIFY). `credit_fates` and `consent_fates` follow the order of the carried changes."""

    user_id: str
    account: Account | None  # to write, when it is not what the store holds
    rows: tuple[LedgerRecord, ...]
    keys: tuple[KeyRecord, ...]
    consent: UserConsent | None  # to write, when the carried one wins
    events: tuple[ConsentEvent, ...]
    expected: UserState
    credit_fates: tuple[Fate, ...] = ()
    consent_fates: tuple[Fate, ...] = ()
    tally: Tally = field(default_factory=Tally)

    @property
    def writes(self) -> bool:
        return bool(
            self.account is not None or self.rows or self.keys or self.consent or self.events
        )


def carried_state(state: UserState, *, keys: bool = True) -> Carried:
    """Another store's state of a user as what it carries: each row a change, applied as
    it was (a deduction or refund of its amount, a refill, an upgrade). `keys`: the state
    holds every key it claimed (not so in an export of format 1)."""
    claims = {record.key: record.claim for record in state.keys}
    credits = []
    is_guest = state.account.is_guest if state.account is not None else True
    for row in state.ledger:
        key = row.idempotency_key
        change: Change | Read
        match row.kind:
            case "deduction":
                change = Deduct(-row.amount, is_guest, row.description)
            case "refund":
                change = Refund(row.amount, row.description)
            case "upgrade":
                change = Upgrade()
            case _:
                change = Read(is_guest)
        claim = claims.get(key) if key is not None else None
        credits.append(CarriedCredit(change, row.timestamp, key, claim or row.claim(), row))
    return Carried(
        state.user_id,
        state.account,
        tuple(credits),
        state.keys if keys else None,
        state.consent,
        events=state.events,
        erased_at=None if state.erasure is None else state.erasure.erased_at,
    )


def carry(held: UserState, carried: Carried, rules: CreditRules, horizon: datetime) -> Plan:
    """The plan for one user (module docstring). `held`: what the store holds of them,
    with its erasure record; `horizon`: now less the retention period (HORIZON)."""
    if is_pseudonym(carried.user_id):
        return _books(held, carried)
    return _Carry(held, carried, rules, horizon).plan()


def clamp_key(row: LedgerRecord) -> str:
    """CLAMP: the key a clamped row without a key of its own is known by, made from it."""
    identity = repr((row.kind, row.amount, row.timestamp.isoformat(), row.description))
    return ("clamped:" + hashlib.sha256(identity.encode()).hexdigest())[:KEY_LENGTH]


def _books(held: UserState, carried: Carried) -> Plan:
    """BOOKS."""
    rows = tuple(missing((c.row for c in carried.credits if c.row is not None), held.ledger))
    expected = replace(held, ledger=held.ledger + rows)
    return Plan(carried.user_id, None, rows, (), None, (), expected, tally=Tally(added=len(rows)))


class _Carry:
    """One user's plan, worked out step by step (see `carry`)."""

    def __init__(
        self, held: UserState, carried: Carried, rules: CreditRules, horizon: datetime
    ) -> None:
        self.held = held
        self.carried = carried
        self.rules = rules
        self.horizon = horizon
        self.erasure: Erasure | None = held.erasure
        self.erased_at = None if held.erasure is None else held.erasure.erased_at
        self.tally = Tally()
        self.rows: list[LedgerRecord] = []
        self.keys: list[KeyRecord] = []
        self.events: list[ConsentEvent] = []
        # BY IDENTITY: the keys the store knows, with their claims, and its rows without one.
        self.known: dict[str, Claim | None] = {record.key: record.claim for record in held.keys}
        for row in held.ledger:
            if row.idempotency_key is not None:
                self.known.setdefault(row.idempotency_key, row.claim())
        self.held_keys = set(self.known)
        self.unkeyed = Counter(row for row in held.ledger if row.idempotency_key is None)

    def plan(self) -> Plan:
        account, credit_fates = self._credits()
        consent, consent_fates = self._consents()
        self._carry_keys()
        held = self.held
        rows, keys, events = tuple(self.rows), tuple(self.keys), tuple(self.events)
        expected = UserState(
            held.user_id,
            account,
            held.ledger + rows,
            consent or held.consent,
            held.keys + keys,
            held.events + events,
            held.erasure,
        )
        self.tally.added = len(rows)
        return Plan(
            held.user_id,
            account if account != held.account else None,
            rows,
            keys,
            consent,
            events,
            expected,
            credit_fates,
            consent_fates,
            self.tally,
        )

    # Credits.

    def _credits(self) -> tuple[Account | None, tuple[Fate, ...]]:
        held, carried = self.held, self.carried
        fates: list[Fate | None] = [None] * len(carried.credits)
        lacking = []
        for index, credit in enumerate(carried.credits):
            fate = self._fate_before(credit)
            if fate is None:
                lacking.append(index)
            else:
                fates[index] = fate
        account = held.account
        if account is None and carried.account is not None and self._after_erasure():
            account = carried.account  # FIRST CARRY
            self._add_rows(lacking, fates, beyond_horizon=True)
        elif account is not None and carried.account is not None and not self._own_changes():
            account = carried.account  # SAME HISTORY
            self._add_rows(lacking, fates, beyond_horizon=False)
        else:
            account = self._on_top(account, lacking, fates)
        return account, tuple(fate or Fate.HELD for fate in fates)

    def _after_erasure(self) -> bool:
        """ERASED: is what is carried wholly after the store's erasure of the user (none,
        or the source knows of it or a later one)?"""
        known = self.carried.erased_at
        return self.erased_at is None or (known is not None and known >= self.erased_at)

    def _fate_before(self, credit: CarriedCredit) -> Fate | None:
        """ERASED, BY IDENTITY and CONFLICT, before any rule applies; None: lacking."""
        if self.erased_at is not None and credit.at <= self.erased_at:
            self.tally.erased += 1
            return Fate.ERASED
        if credit.key is not None:
            return self._known_key(credit)
        row = credit.row
        if row is None:
            return None
        if self.unkeyed[row] > 0:
            self.unkeyed[row] -= 1
            return Fate.HELD
        if clamp_key(row) in self.known:
            return Fate.HELD
        return None

    def _known_key(self, credit: CarriedCredit) -> Fate | None:
        """BY IDENTITY and CONFLICT for a keyed change; None: the store lacks it."""
        assert credit.key is not None
        if credit.key not in self.known:
            return None
        known = self.known[credit.key]
        if known is not None and credit.claim is not None and not _same(known, credit.claim):
            self.tally.conflicts += 1
            return Fate.CONFLICT
        return Fate.HELD

    def _own_changes(self) -> bool:
        """SAME HISTORY fails: the store holds a change the carried state lacks, or the
        same key on another row (a clamp, or a key reused for another request)."""
        held, carried = self.held.account, self.carried.account
        assert held is not None and carried is not None
        if held.last_reset > carried.last_reset or (carried.is_guest and not held.is_guest):
            return True
        keys = {credit.key for credit in self.carried.credits if credit.key is not None}
        keys.update(record.key for record in self.carried.keys or ())
        rows = {credit.key: credit.row for credit in self.carried.credits if credit.key}
        unkeyed = Counter(
            credit.row
            for credit in self.carried.credits
            if credit.row is not None and credit.key is None
        )
        for row in self.held.ledger:
            if row.timestamp < self.horizon:
                continue
            if row.idempotency_key is None:
                if unkeyed[row] <= 0:
                    return True
                unkeyed[row] -= 1
            elif row.idempotency_key not in keys or rows.get(row.idempotency_key, row) != row:
                return True
        return False

    def _add_rows(self, lacking: list[int], fates: list[Fate | None], beyond_horizon: bool) -> None:
        """FIRST CARRY and SAME HISTORY: the lacking rows added as they are."""
        for index in lacking:
            credit = self.carried.credits[index]
            if credit.row is None or (not beyond_horizon and credit.at < self.horizon):
                fates[index] = Fate.STALE if credit.row is not None else Fate.HELD
                continue
            self.rows.append(credit.row)
            self._claim(credit)
            fates[index] = Fate.APPLIED
            self.tally.applied += 1

    def _on_top(
        self, account: Account | None, lacking: list[int], fates: list[Fate | None]
    ) -> Account | None:
        """ON TOP: each lacking change applied by the rules, oldest first."""
        credits = self.carried.credits
        for index in sorted(lacking, key=lambda index: credits[index].at):
            credit = credits[index]
            row = credit.row
            if row is not None and _opening(row):
                fates[index] = Fate.HELD  # OPENING
                continue
            if row is not None and account is not None and credit.at < self.horizon:
                fates[index] = Fate.STALE  # HORIZON
                continue
            # A key carried twice (a retry journaled again) is applied once.
            known = None if credit.key is None else self._known_key(credit)
            if known is not None:
                fates[index] = known
                continue
            account, fates[index] = self._apply(account, credit)
        return account

    def _apply(self, account: Account | None, credit: CarriedCredit) -> tuple[Account | None, Fate]:
        change = credit.change
        refill = isinstance(change, Read | Reset)
        if refill and account is not None and account.last_reset >= credit.at:
            return account, Fate.HELD  # REFILL ONCE: refilled at T or since
        erased = None if self.erasure is None else self.erasure.account
        user_id = self.held.user_id
        fate = Fate.APPLIED
        clamped_to = 0
        try:
            outcome = self.rules.apply(account, user_id, change, credit.at, erased=erased)
        except InsufficientCreditsError as short:
            assert isinstance(change, Deduct)  # CLAMP: the only change that can be short
            fate = Fate.CLAMPED
            self.tally.clamped += 1
            clamped_to = short.available
            left: Change | Read = Read(change.is_guest)
            if clamped_to:
                note = CLAMP_NOTE.format(required=short.required)
                left = Deduct(clamped_to, change.is_guest, note)
            outcome = self.rules.apply(account, user_id, left, credit.at, erased=erased)
        if isinstance(change, Read) and not outcome.entries and account is not None:
            fate = Fate.HELD  # REFILL ONCE: not due at T
        key = credit.key
        if key is None and fate is Fate.CLAMPED and credit.row is not None:
            key = clamp_key(credit.row)  # CLAMP: known by it from now on
            self.known[key] = None
            if not clamped_to:  # no row to hold it: claimed instead
                self.keys.append(KeyRecord(user_id, key, credit.at, Claim("deduction", None)))
        for index, entry in enumerate(outcome.entries):
            own = outcome.keyed(index) and not isinstance(change, Read)
            self.rows.append(
                LedgerRecord(
                    user_id,
                    entry.kind,
                    entry.amount,
                    credit.at,
                    entry.description,
                    key if own else None,
                )
            )
        self._claim(credit)
        if fate is Fate.APPLIED:
            self.tally.applied += 1
        return outcome.account, fate

    def _claim(self, credit: CarriedCredit) -> None:
        """KEYS: a change carried is known by its key from now on; where claims do not
        travel, a keyed deduction or refund claims it, with its request."""
        key = credit.key
        if key is None:
            return
        claim = credit.claim
        self.known[key] = claim
        keyed = isinstance(credit.change, Deduct | Refund)
        if self.carried.keys is None and claim is not None and keyed:
            self.keys.append(KeyRecord(self.held.user_id, key, credit.at, claim))

    def _carry_keys(self) -> None:
        """KEYS: the claims carried that the store lacks, a refund's that credited nothing
        (no row) among them."""
        if self.carried.keys is None:
            return
        planned = {record.key for record in self.keys}
        for record in self.carried.keys:
            if record.key in self.held_keys or record.key in planned:
                continue
            if self.erased_at is not None and record.created_at <= self.erased_at:
                continue
            self.keys.append(record)
            planned.add(record.key)

    # Consents.

    def _consents(self) -> tuple[UserConsent | None, tuple[Fate, ...]]:
        held, carried = self.held, self.carried
        current = held.consent
        written: UserConsent | None = None
        incoming = carried.consent
        if (
            incoming is not None
            and not self._erased(incoming.updated_at)
            and later_consent(incoming, current) is not None
        ):
            current = written = incoming
        fates = []
        added: list[ConsentEvent] = []
        for change in carried.consents:
            if self._erased(change.at):
                self.tally.erased += 1
                fates.append(Fate.ERASED)
                continue
            after, fate = _consent_change(held.user_id, current, change)
            if fate is Fate.APPLIED:
                assert after is not None
                current = written = after
                added.append(event_of(after))
                self.tally.applied += 1
            elif change.event is not None:
                added.append(change.event)  # acknowledged: the history keeps it
            fates.append(fate)
        events = [event for event in carried.events if not self._erased(event.recorded_at)]
        self.events = missing(events + added, held.events)
        return written, tuple(fates)

    def _erased(self, at: datetime) -> bool:
        return self.erased_at is not None and at <= self.erased_at


def _consent_change(
    user_id: str, current: UserConsent | None, change: CarriedConsent
) -> tuple[UserConsent | None, Fate]:
    """LATER CONSENT for one journaled change: the consent after it, and its fate."""
    if current is not None and current.updated_at >= change.at:
        return None, Fate.HELD  # this very change, or a later one, stands
    after = consent_after(user_id, current, change.change, change.at)
    return after, Fate.HELD if after is None else Fate.APPLIED


def _same(known: Claim, carried: Claim) -> bool:
    """Does a held key's claim stand for the carried change (REUSED KEY, either way)?"""
    if known.operation != carried.operation:
        return False
    return known.request is None or carried.request is None or known.request == carried.request


def _opening(row: LedgerRecord) -> bool:
    unkeyed = row.idempotency_key is None
    return row.kind == "deduction" and unkeyed and row.description == CARRIED_NOTE


def carry_all(
    held: Sequence[UserState], carried: Sequence[Carried], rules: CreditRules, horizon: datetime
) -> list[Plan]:
    """`carry` for each carried user, given what the store holds of each (by user_id)."""
    by_user = {state.user_id: state for state in held}
    return [
        carry(by_user.get(one.user_id) or UserState(one.user_id), one, rules, horizon)
        for one in carried
    ]


def outcome(plans: Sequence[Plan], after: Sequence[UserState]) -> Merged:
    """What the merge of these plans did, and VERIFY of what the store holds afterwards."""
    tally = Tally()
    for plan in plans:
        tally.add(plan.tally)
    return Merged(
        tally,
        verified([plan.expected for plan in plans], after),
        {plan.user_id: plan.expected for plan in plans},
        {plan.user_id: (plan.credit_fates, plan.consent_fates) for plan in plans},
    )
