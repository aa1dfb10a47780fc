"""The original in-memory store (dicts and lists), as a real adapter of the protocols.

Each call decides and stores its outcome with no await in between, so on the event
loop racing coroutines see the atomicity the SQL store gets from its transactions.
Everything is lost when the process ends, unless handed over to another store first
(SPEC §7). Process memory is bounded: at most `max_users` users (a new one past it is
refused with StorageFullError, 507) and `max_entries` cached answers (the oldest dropped).
"""

from __future__ import annotations

import copy
import heapq
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from app.clock import Clock, utc_now
from app.domain.audit import LedgerFigures, figures
from app.domain.carry import Carried, Plan, carry_all, outcome
from app.domain.consents import ConsentChange, consent_after
from app.domain.credits import Account, Attempt, Claim, CreditRules, Deduct, Operation, Refund
from app.domain.privacy import Pseudonyms, is_pseudonym
from app.domain.state import Erasure, KeyRecord, LedgerRecord, Merged, UserState, later_erasure
from app.errors import StorageFullError
from app.repositories.base import StagedBatch, StagedRows, Stores, carried_batch, erase_held
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits, event_of

DEFAULT_MAX_USERS = 100_000
DEFAULT_CACHE_ENTRIES = 10_000


@dataclass
class MemoryData:
    """One process's state, shared by the memory store's repositories."""

    accounts: dict[str, Account] = field(default_factory=dict)
    ledger: defaultdict[str, list[LedgerRecord]] = field(default_factory=lambda: defaultdict(list))
    # Claimed keys by user, then by key: when, and what the first use asked for.
    keys: defaultdict[str, dict[str, tuple[datetime, Claim]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    consents: dict[str, UserConsent] = field(default_factory=dict)
    consent_events: defaultdict[str, list[ConsentEvent]] = field(
        default_factory=lambda: defaultdict(list)
    )
    erasures: dict[str, Erasure] = field(default_factory=dict)  # by pseudonym (SPEC §10)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    max_users: int = DEFAULT_MAX_USERS
    held: set[str] = field(default_factory=set)  # users with an account or a consent

    def room_for(self, user_ids: Iterable[str]) -> None:
        """Raises StorageFullError, before anything changes, if holding these users as
        well would pass `max_users`. The caller adds them to `held` once stored."""
        new = {user_id for user_id in user_ids if user_id not in self.held}
        if new and len(self.held) + len(new) > self.max_users:
            raise StorageFullError(self.max_users)

    def forget(self, user_id: str) -> None:
        """Nothing of the user kept (the outage fallback's store, on an erasure)."""
        for held in (self.accounts, self.ledger, self.keys, self.consents, self.consent_events):
            held.pop(user_id, None)
        self.held.discard(user_id)

    def adopt(self, user_id: str, account: Account | None, consent: UserConsent | None) -> None:
        """Hold a user as another store last held it, unless held here already (the
        outage fallback's start). StorageFullError past `max_users`."""
        if user_id in self.held or (account is None and consent is None):
            return
        self.room_for((user_id,))
        if account is not None:
            self.accounts[user_id] = account
        if consent is not None:
            self.consents[user_id] = consent
        self.held.add(user_id)


class MemoryCreditRepository:
    """Accounts, ledger and idempotency keys in dicts (see CreditRepository): the
    domain's rules applied, the outcome stored only once decided."""

    def __init__(
        self, rules: CreditRules, data: MemoryData, pseudonyms: Pseudonyms | None = None
    ) -> None:
        self._rules = rules
        self._data = data
        self._pseudonyms = pseudonyms

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        data = self._data
        if user_id not in data.held:
            data.room_for((user_id,))
        key = attempt.key
        held = None if key is None or user_id not in data.keys else data.keys[user_id].get(key)
        claimed = None if held is None else held[1]
        account = data.accounts.get(user_id)
        erased = None
        if account is None and self._pseudonyms is not None and data.erasures:
            erasure = data.erasures.get(self._pseudonyms.of(user_id))
            erased = None if erasure is None else erasure.account
        outcome = self._rules.apply(
            account, user_id, operation, attempt.at, claimed=claimed, erased=erased
        )
        attempt.decided(claimed is not None)
        data.accounts[user_id] = outcome.account
        data.held.add(user_id)
        for index, entry in enumerate(outcome.entries):
            data.ledger[user_id].append(
                LedgerRecord(
                    user_id,
                    entry.kind,
                    entry.amount,
                    attempt.at,
                    entry.description,
                    attempt.key if outcome.keyed(index) else None,
                    next(data.ids),
                )
            )
        if key is not None and claimed is None and isinstance(operation, Deduct | Refund):
            data.keys[user_id][key] = (attempt.at, Claim.of(operation))
        return self._rules.view(outcome.account)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        rows = self._data.ledger.get(user_id, [])[-limit:]
        return [row.transaction() for row in reversed(rows)]

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        data = self._data
        deleted = 0
        for user_id, rows in list(data.ledger.items()):
            kept = [row for row in rows if row.timestamp >= cutoff]
            deleted += len(rows) - len(kept)
            data.ledger[user_id] = kept
        for user_id, claimed in list(data.keys.items()):
            data.keys[user_id] = {key: held for key, held in claimed.items() if held[0] >= cutoff}
        return deleted


class MemoryConsentRepository:
    """Consents in a dict (see ConsentRepository)."""

    def __init__(self, data: MemoryData) -> None:
        self._data = data
        self._consents = data.consents

    async def get(self, user_id: str) -> UserConsent | None:
        return self._consents.get(user_id)

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        existing = self._consents.get(user_id)
        consent = consent_after(user_id, existing, change, now)
        if consent is None:
            return None
        if existing is None and user_id not in self._data.held:
            self._data.room_for((user_id,))
        self._data.held.add(user_id)
        self._consents[user_id] = consent
        self._recorded(consent)
        return consent

    async def history(self, user_id: str) -> list[ConsentEvent]:
        # Kept in the order recorded (a carried event by its instant among them).
        return list(reversed(self._data.consent_events.get(user_id, ())))

    def _recorded(self, consent: UserConsent) -> None:
        self._data.consent_events[consent.user_id].append(event_of(consent))

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        ordered = sorted(self._consents.values(), key=lambda consent: consent.user_id)
        return ordered[offset : offset + limit]

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        return self._consents.get(user_id), None


class MemoryCacheRepository:
    """Cached answers in a dict (see CacheRepository). Results are copied in and out,
    so a caller mutating its dict cannot change what the cache holds. At most
    `max_entries`: a new answer past it first drops the expired ones, else the oldest."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self._max_entries = max_entries
        self._entries: dict[str, tuple[dict[str, Any], datetime]] = {}

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return copy.deepcopy(entry[0])

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        entries = self._entries
        full = key not in entries and len(entries) >= self._max_entries
        if full and not await self.delete_expired(now=now):
            del entries[next(iter(entries))]  # dicts keep insertion order: the oldest
        entries[key] = (copy.deepcopy(result), expires_at)

    async def delete_expired(self, *, now: datetime) -> int:
        expired = [key for key, (_, expires_at) in self._entries.items() if expires_at <= now]
        for key in expired:
            del self._entries[key]
        return len(expired)

    async def clear(self) -> None:
        self._entries.clear()

    async def count(self, *, now: datetime) -> int:
        return sum(1 for _, expires_at in self._entries.values() if expires_at > now)


class MemoryStateRepository:
    """The memory store's users as a whole (see StateRepository). A read, a merge or an
    erasure runs with no await inside, so it sees and leaves the state as one.
    `pseudonyms`: erasure configured (ERASURE_KEY); `retention`: the ledger's
    (TRANSACTION_RETENTION_DAYS), for the merge's HORIZON."""

    def __init__(
        self,
        data: MemoryData,
        rules: CreditRules,
        *,
        retention: timedelta,
        pseudonyms: Pseudonyms | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._data = data
        self._rules = rules
        self._retention = retention
        self._pseudonyms = pseudonyms
        self._clock = clock

    async def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        data = self._data
        users = sorted(data.accounts.keys() | data.consents.keys() | data.erasures.keys())
        for start in range(0, len(users), batch_size):
            yield users[start : start + batch_size]

    async def erasures(self, batch_size: int) -> AsyncIterator[list[Erasure]]:
        records = list(self._data.erasures.values())
        for start in range(0, len(records), batch_size):
            yield records[start : start + batch_size]

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        return [self._state(user_id) for user_id in user_ids]

    def _state(self, user_id: str) -> UserState:
        data = self._data
        claimed = data.keys.get(user_id, {})
        keys = tuple(KeyRecord(user_id, key, at, claim) for key, (at, claim) in claimed.items())
        return UserState(
            user_id,
            data.accounts.get(user_id),
            tuple(data.ledger.get(user_id, ())),
            data.consents.get(user_id),
            keys,
            tuple(data.consent_events.get(user_id, ())),
            self._erasure_of(user_id),
        )

    def _erasure_of(self, user_id: str) -> Erasure | None:
        erasures = self._data.erasures
        if is_pseudonym(user_id):
            return erasures.get(user_id)
        if self._pseudonyms is None or not erasures:
            return None
        return erasures.get(self._pseudonyms.of(user_id))

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        data = self._data
        page = heapq.nsmallest(
            limit, (user_id for user_id in data.accounts if after is None or user_id > after)
        )
        return [figures(data.accounts[user_id], data.ledger.get(user_id, ())) for user_id in page]

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        users = [one.user_id for one in carried]
        horizon = self._clock() - self._retention
        plans = carry_all(await self.read(users), carried, self._rules, horizon)
        data = self._data
        data.room_for(
            plan.user_id
            for plan in plans
            if plan.expected.account is not None or plan.expected.consent is not None
        )
        for plan in plans:
            self._write(plan)
        return outcome(plans, await self.read(users))

    def _write(self, plan: Plan) -> None:
        data = self._data
        user_id = plan.user_id
        if plan.account is not None:
            data.accounts[user_id] = plan.account
            data.held.add(user_id)
        if plan.rows:
            held = data.ledger[user_id]
            held.extend(replace(row, id=next(data.ids)) for row in plan.rows)
            held.sort(key=lambda row: (row.timestamp, row.id))
        if plan.keys:
            claimed = data.keys[user_id]
            for record in plan.keys:
                claimed.setdefault(record.key, (record.created_at, record.claim))
        if plan.consent is not None:
            data.consents[user_id] = plan.consent
            data.held.add(user_id)
        if plan.events:
            events = data.consent_events[user_id]
            events.extend(plan.events)
            events.sort(key=lambda event: event.recorded_at)

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        return await self.merge(carried_batch(batch, rows, self._pseudonyms))

    async def merge_erasures(self, erasures: Sequence[Erasure]) -> int:
        data = self._data
        new = {}
        for record in erasures:
            if later_erasure(record, data.erasures.get(record.pseudonym)) is not None:
                data.erasures[record.pseudonym] = record
                new[record.pseudonym] = record
        return await erase_held(self, self._pseudonyms, new)

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        return self._erase(user_id, pseudonym, now)

    def _erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        data = self._data
        rows = data.ledger.pop(user_id, [])
        account = data.accounts.pop(user_id, None)
        consent = data.consents.pop(user_id, None)
        events = data.consent_events.pop(user_id, None)
        if account is None and consent is None and not rows and not events:
            recorded = data.erasures.get(pseudonym)  # recorded all the same, as in SQL
            if recorded is None:
                data.erasures[pseudonym] = Erasure(pseudonym, now)
            elif recorded.erased_at < now:
                data.erasures[pseudonym] = replace(recorded, erased_at=now)
            return None
        data.held.discard(user_id)
        kept = None if account is None else replace(account, user_id=pseudonym)
        data.erasures[pseudonym] = Erasure(pseudonym, now, kept)
        books = data.ledger[pseudonym]
        books.extend(
            replace(row, user_id=pseudonym, description=None, idempotency_key=None) for row in rows
        )
        books.sort(key=lambda row: (row.timestamp, row.id))
        data.keys.pop(user_id, None)
        return len(rows)


def memory_stores(
    rules: CreditRules,
    data: MemoryData | None = None,
    *,
    cache_entries: int = DEFAULT_CACHE_ENTRIES,
    pseudonyms: Pseudonyms | None = None,
) -> Stores:
    """The memory store's repositories, over `data` (fresh when not given)."""
    data = MemoryData() if data is None else data
    return Stores(
        credits=MemoryCreditRepository(rules, data, pseudonyms),
        consents=MemoryConsentRepository(data),
        cache=MemoryCacheRepository(cache_entries),
    )
