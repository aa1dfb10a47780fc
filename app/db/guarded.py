"""Each repository behind the guard: every call, one whole unit of work, retried on
transient faults and protected by the circuit breaker (app/db/resilience.py).

One wrapper per protocol, each method written out: a method added to a protocol and
not here fails the type check where the wrapper is used as that protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Protocol

from app.db.resilience import Guard
from app.domain.audit import LedgerFigures
from app.domain.carry import Carried
from app.domain.consents import ConsentChange
from app.domain.credits import Attempt, Operation
from app.domain.state import Erasure, Merged, UserState
from app.repositories.base import (
    CacheRepository,
    ConsentRepository,
    CreditRepository,
    EntryReader,
    Erasures,
    StagedBatch,
    StagedRows,
    StateRepository,
)
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits


class ExpiringCache(CacheRepository, EntryReader, Protocol):
    """A cache repository that can also tell an entry's expiry."""


class GuardedCredits:
    """A CreditRepository behind the guard. A retry sends the same attempt (app/domain/
    credits.py), so a change whose answer was lost is not applied twice."""

    def __init__(self, inner: CreditRepository, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        return await self._guard.run(self._inner.apply, user_id, operation, attempt)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        return await self._guard.run(self._inner.history, user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        return await self._guard.run(self._inner.delete_transactions_before, cutoff)


class GuardedConsents:
    """A ConsentRepository behind the guard."""

    def __init__(self, inner: ConsentRepository, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard

    async def get(self, user_id: str) -> UserConsent | None:
        return await self._guard.run(self._inner.get, user_id)

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        return await self._guard.run(self._inner.apply, user_id, change, now=now)

    async def history(self, user_id: str) -> list[ConsentEvent]:
        return await self._guard.run(self._inner.history, user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        return await self._guard.run(self._inner.page, limit, offset)

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        return await self._guard.run(self._inner.admission, user_id, now=now)


class GuardedCache:
    """A CacheRepository behind the guard."""

    def __init__(self, inner: CacheRepository, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        return await self._guard.run(self._inner.get, key, now=now)

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        await self._guard.run(self._inner.set, key, result, now=now, expires_at=expires_at)

    async def delete_expired(self, *, now: datetime) -> int:
        return await self._guard.run(self._inner.delete_expired, now=now)

    async def clear(self) -> None:
        await self._guard.run(self._inner.clear)

    async def count(self, *, now: datetime) -> int:
        return await self._guard.run(self._inner.count, now=now)


class GuardedEntryCache(GuardedCache):
    """A cache that can tell an entry's expiry (Redis) behind the guard, still telling it:
    the local tier in front then keeps a copy no longer than the entry lives."""

    def __init__(self, inner: ExpiringCache, guard: Guard) -> None:
        super().__init__(inner, guard)
        self._expiring = inner

    async def get_entry(self, key: str, *, now: datetime) -> tuple[dict[str, Any], datetime] | None:
        return await self._guard.run(self._expiring.get_entry, key, now=now)


class GuardedErasures:
    """Erasures behind the guard."""

    def __init__(self, inner: Erasures, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard

    async def erased_at(self, user_id: str) -> datetime | None:
        return await self._guard.run(self._inner.erased_at, user_id)

    async def erased_since(self, after: datetime) -> list[tuple[str, datetime]]:
        return await self._guard.run(self._inner.erased_since, after)

    def pseudonym(self, user_id: str) -> str:
        return self._inner.pseudonym(user_id)


class GuardedState:
    """A StateRepository behind the guard: a merge may be retried, since carrying the same
    state again changes nothing (app/domain/carry.py, BY IDENTITY)."""

    def __init__(self, inner: StateRepository, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard

    async def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        async for user_ids in self._inner.user_ids(batch_size):
            yield user_ids

    async def erasures(self, batch_size: int) -> AsyncIterator[list[Erasure]]:
        async for records in self._inner.erasures(batch_size):
            yield records

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        return await self._guard.run(self._inner.read, user_ids)

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        return await self._guard.run(self._inner.merge, carried)

    async def merge_erasures(self, erasures: Sequence[Erasure]) -> int:
        return await self._guard.run(self._inner.merge_erasures, erasures)

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        return await self._guard.run(self._inner.erase, user_id, pseudonym, now)

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        return await self._guard.run(self._inner.ledger_figures, after, limit)

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        return await self._guard.run(self._inner.merge_rows, batch, rows)
