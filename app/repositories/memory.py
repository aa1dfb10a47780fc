"""The original in-memory store (dicts and lists), as a real adapter of the protocols.

Each method runs its whole read-check-write under one asyncio lock, so racing
coroutines see the same atomicity the SQL store gets from its statements.
Everything is lost when the process ends.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.errors import InsufficientCreditsError
from app.repositories.base import RESET_NOTE, UPGRADE_NOTE, CreditPolicy, Stores, upgraded_balance
from app.schemas import CreditTransaction, TransactionType, UserConsent, UserCredits


@dataclass
class _Account:
    is_guest: bool
    available: int
    max: int
    last_reset: datetime


class MemoryCreditRepository:
    """Accounts, ledger and idempotency keys in dicts (see CreditRepository)."""

    def __init__(self, policy: CreditPolicy) -> None:
        self._policy = policy
        self._lock = asyncio.Lock()
        self._accounts: dict[str, _Account] = {}
        self._ledger: dict[str, list[CreditTransaction]] = defaultdict(list)
        self._keys: dict[tuple[str, str], datetime] = {}
        self._ids = itertools.count(1)

    async def get_or_create(self, user_id: str, *, is_guest: bool, now: datetime) -> UserCredits:
        async with self._lock:
            return self._view(user_id, self._prepare(user_id, is_guest, now))

    async def deduct(
        self,
        user_id: str,
        amount: int,
        *,
        is_guest: bool,
        now: datetime,
        description: str | None,
        idempotency_key: str | None,
    ) -> UserCredits:
        async with self._lock:
            account = self._prepare(user_id, is_guest, now)
            if not self._claim(user_id, idempotency_key, now):
                return self._view(user_id, account)
            if account.available < amount:
                self._unclaim(user_id, idempotency_key)
                raise InsufficientCreditsError(user_id, account.available, amount)
            account.available -= amount
            self._record(user_id, "deduction", -amount, now, description)
            return self._view(user_id, account)

    async def refund(
        self,
        user_id: str,
        amount: int,
        *,
        now: datetime,
        description: str | None,
        idempotency_key: str | None,
    ) -> UserCredits:
        async with self._lock:
            account = self._prepare(user_id, True, now)
            if self._claim(user_id, idempotency_key, now):
                credited = min(amount, account.max - account.available)
                account.available += credited
                self._record(user_id, "refund", credited, now, description)
            return self._view(user_id, account)

    async def upgrade(self, user_id: str, *, registered_max: int, now: datetime) -> UserCredits:
        async with self._lock:
            account = self._prepare(user_id, True, now)
            if account.is_guest:
                before = account.available
                account.available = upgraded_balance(account.available, account.max, registered_max)
                account.is_guest, account.max = False, registered_max
                self._record(user_id, "upgrade", account.available - before, now, UPGRADE_NOTE)
            return self._view(user_id, account)

    async def reset(self, user_id: str, *, now: datetime) -> UserCredits:
        async with self._lock:
            account = self._prepare(user_id, True, now)
            self._refill(user_id, account, now)
            return self._view(user_id, account)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        async with self._lock:
            return list(reversed(self._ledger.get(user_id, [])[-limit:]))

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        async with self._lock:
            deleted = 0
            for user_id, rows in list(self._ledger.items()):
                kept = [row for row in rows if row.timestamp >= cutoff]
                deleted += len(rows) - len(kept)
                self._ledger[user_id] = kept
            self._keys = {key: at for key, at in self._keys.items() if at >= cutoff}
            return deleted

    def _prepare(self, user_id: str, is_guest: bool, now: datetime) -> _Account:
        account = self._accounts.get(user_id)
        if account is None:
            full = self._policy.max_for(is_guest)
            account = self._accounts[user_id] = _Account(is_guest, full, full, now)
        elif account.last_reset <= self._policy.reset_cutoff(now):
            self._refill(user_id, account, now)
        return account

    def _refill(self, user_id: str, account: _Account, now: datetime) -> None:
        refill = account.max - account.available
        account.available, account.last_reset = account.max, now
        self._record(user_id, "reset", refill, now, RESET_NOTE)

    def _claim(self, user_id: str, key: str | None, now: datetime) -> bool:
        if key is None:
            return True
        if (user_id, key) in self._keys:
            return False
        self._keys[(user_id, key)] = now
        return True

    def _unclaim(self, user_id: str, key: str | None) -> None:
        if key is not None:
            del self._keys[(user_id, key)]

    def _record(
        self,
        user_id: str,
        kind: TransactionType,
        amount: int,
        now: datetime,
        description: str | None,
    ) -> None:
        if amount == 0:  # nothing moved, nothing to record (the ledger never holds 0)
            return
        self._ledger[user_id].append(
            CreditTransaction(
                id=next(self._ids),
                user_id=user_id,
                transaction_type=kind,
                amount=amount,
                timestamp=now,
                description=description,
            )
        )

    def _view(self, user_id: str, account: _Account) -> UserCredits:
        return self._policy.account(
            user_id=user_id,
            is_guest=account.is_guest,
            available_credits=account.available,
            max_credits=account.max,
            last_reset_timestamp=account.last_reset,
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


def memory_stores(policy: CreditPolicy) -> Stores:
    return Stores(
        credits=MemoryCreditRepository(policy),
        consents=MemoryConsentRepository(),
        cache=MemoryCacheRepository(),
    )
