"""The original in-memory store (dicts and lists), as a real adapter of the protocols.

Each call decides and stores its outcome with no await in between, so on the event
loop racing coroutines see the atomicity the SQL store gets from its transactions.
Everything is lost when the process ends.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from datetime import datetime
from typing import Any

from app.domain.credits import Account, Attempt, CreditRules, Entry, Operation
from app.repositories.base import Stores
from app.schemas import CreditTransaction, UserConsent, UserCredits


class MemoryCreditRepository:
    """Accounts, ledger and idempotency keys in dicts (see CreditRepository): the
    domain's rules applied, the outcome stored only once decided."""

    def __init__(self, rules: CreditRules) -> None:
        self._rules = rules
        self._accounts: dict[str, Account] = {}
        self._ledger: dict[str, list[CreditTransaction]] = defaultdict(list)
        self._keys: dict[tuple[str, str], datetime] = {}
        self._ids = itertools.count(1)

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        key = None if attempt.key is None else (user_id, attempt.key)
        repeated = key is not None and key in self._keys
        outcome = self._rules.apply(
            self._accounts.get(user_id), user_id, operation, attempt.at, repeated=repeated
        )
        self._accounts[user_id] = outcome.account
        for entry in outcome.entries:
            self._ledger[user_id].append(self._row(user_id, entry, attempt.at))
        if key is not None and not repeated:
            self._keys[key] = attempt.at
        return self._rules.view(outcome.account)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        return list(reversed(self._ledger.get(user_id, [])[-limit:]))

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        deleted = 0
        for user_id, rows in list(self._ledger.items()):
            kept = [row for row in rows if row.timestamp >= cutoff]
            deleted += len(rows) - len(kept)
            self._ledger[user_id] = kept
        self._keys = {key: at for key, at in self._keys.items() if at >= cutoff}
        return deleted

    def _row(self, user_id: str, entry: Entry, now: datetime) -> CreditTransaction:
        return CreditTransaction(
            id=next(self._ids),
            user_id=user_id,
            transaction_type=entry.kind,
            amount=entry.amount,
            timestamp=now,
            description=entry.description,
        )


class MemoryConsentRepository:
    """Consents in a dict (see ConsentRepository)."""

    def __init__(self) -> None:
        self._consents: dict[str, UserConsent] = {}

    async def get(self, user_id: str) -> UserConsent | None:
        return self._consents.get(user_id)

    async def upsert(
        self, user_id: str, *, terms_accepted: bool, marketing_consent: bool, now: datetime
    ) -> UserConsent:
        existing = self._consents.get(user_id)
        consent = UserConsent(
            user_id=user_id,
            terms_accepted=terms_accepted,
            marketing_consent=marketing_consent,
            timestamp=existing.timestamp if existing else now,
            updated_at=now,
        )
        self._consents[user_id] = consent
        return consent

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        existing = self._consents.get(user_id)
        if existing is None:
            return None
        consent = existing.model_copy(
            update={"marketing_consent": marketing_consent, "updated_at": now}
        )
        self._consents[user_id] = consent
        return consent

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        ordered = sorted(self._consents.values(), key=lambda consent: consent.user_id)
        return ordered[offset : offset + limit]

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        return self._consents.get(user_id), None


class MemoryCacheRepository:
    """Cached answers in a dict (see CacheRepository). Results are copied in and out,
    so a caller mutating its dict cannot change what the cache holds."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[dict[str, Any], datetime]] = {}

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return copy.deepcopy(entry[0])

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        self._entries[key] = (copy.deepcopy(result), expires_at)

    async def delete_expired(self, *, now: datetime) -> int:
        expired = [key for key, (_, expires_at) in self._entries.items() if expires_at <= now]
        for key in expired:
            del self._entries[key]
        return len(expired)

    async def clear(self) -> None:
        self._entries.clear()

    async def count(self, *, now: datetime) -> int:
        return sum(1 for _, expires_at in self._entries.values() if expires_at > now)


def memory_stores(rules: CreditRules) -> Stores:
    return Stores(
        credits=MemoryCreditRepository(rules),
        consents=MemoryConsentRepository(),
        cache=MemoryCacheRepository(),
    )
