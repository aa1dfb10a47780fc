"""The in-memory fallback (DB_OUTAGE_FALLBACK=memory) and its outbox.

While the database cannot serve, credit and consent calls are served by an
in-memory store of their own. Every change made there goes into an outbox, in
order, and is replayed into the database once it answers again. A credit change
carries its attempt (app/domain/credits.py) into the replay, so each is applied
exactly once, however often a replay is interrupted and resumed. A deduction that no
longer fits the database balance is clamped to what is left and logged, never
dropped silently.

The outbox lives in process memory: if the process dies during an outage, the
changes made since the outage began are lost (README, "When the database is down").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar, assert_never

from app.domain.credits import Attempt, Change, Deduct, Operation, Read
from app.errors import (
    IdempotencyKeyReusedError,
    InsufficientCreditsError,
    StorageUnavailableError,
)
from app.models import IDEMPOTENCY_KEY_LENGTH
from app.repositories.base import ConsentRepository, Stores
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits

logger = logging.getLogger(__name__)
T = TypeVar("T")


DEFAULT_MAX_CHANGES = 100_000


@dataclass(frozen=True)
class CreditChange:
    user_id: str
    change: Change
    attempt: Attempt


@dataclass(frozen=True)
class ConsentRecorded:
    user_id: str
    terms_accepted: bool
    marketing_consent: bool
    terms_version: str | None
    now: datetime


@dataclass(frozen=True)
class MarketingChanged:
    user_id: str
    marketing_consent: bool
    now: datetime


Served = CreditChange | ConsentRecorded | MarketingChanged


class OutageFallback:
    """Owns the fallback store, the outbox and the replay."""

    def __init__(
        self, make_memory: Callable[[], Stores], *, max_changes: int = DEFAULT_MAX_CHANGES
    ) -> None:
        self._make_memory = make_memory
        self.memory = make_memory()
        self.outbox: list[Served] = []
        self._max_changes = max_changes
        self.clamped = 0
        self.key_conflicts = 0
        self.replayed = 0
        self._lock = asyncio.Lock()
        self._replay_task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self.outbox)

    @property
    def full(self) -> bool:
        """The outbox holds OUTAGE_OUTBOX_MAX_CHANGES: further changes are refused (503)
        rather than held in memory without bound."""
        return len(self.outbox) >= self._max_changes

    def record(self, change: Served) -> None:
        self.outbox.append(change)

    def replay_soon(self, database: Stores) -> None:
        """Start a replay in the background unless one runs or nothing waits."""
        if self.outbox and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self.replay(database))

    async def replay(self, database: Stores) -> None:
        """Apply the outbox to the database in order; stops, keeping the rest, if the
        database fails again. When it is empty the fallback store starts afresh, so a
        later outage does not serve stale balances."""
        async with self._lock:
            while self.outbox:
                try:
                    await self._apply(self.outbox[0], database)
                except StorageUnavailableError:
                    logger.warning("outbox replay paused: %d change(s) wait", len(self.outbox))
                    return
                self.outbox.pop(0)
                self.replayed += 1
            self.memory = self._make_memory()
            logger.info("outbox replayed into the database")

    async def close(self, database: Stores) -> None:
        """At shutdown: one last replay attempt, so an outage that ended is not lost."""
        if self._replay_task is not None:
            with contextlib.suppress(Exception):
                await self._replay_task
        with contextlib.suppress(Exception):
            await self.replay(database)
        if self.outbox:
            logger.error("%d change(s) made during the outage were not replayed", self.depth)

    async def _apply(self, served: Served, database: Stores) -> None:
        match served:
            case CreditChange(user_id, change, attempt):
                try:
                    await database.credits.apply(user_id, change, attempt)
                except InsufficientCreditsError as short:
                    await self._clamp(served, short, database)
                except IdempotencyKeyReusedError:
                    # The database holds the key for another request, made before the
                    # outage: its first use stands, and the change is not applied.
                    self.key_conflicts += 1
                    logger.error(
                        "replayed %s for %s not applied: its idempotency key was first used "
                        "for another request",
                        type(change).__name__.lower(),
                        user_id,
                    )
            case ConsentRecorded(user_id, terms_accepted, marketing_consent, version, now):
                await database.consents.upsert(
                    user_id,
                    terms_accepted=terms_accepted,
                    marketing_consent=marketing_consent,
                    terms_version=version,
                    now=now,
                )
            case MarketingChanged(user_id, marketing_consent, now):
                await database.consents.set_marketing(user_id, marketing_consent, now=now)
            case _:
                assert_never(served)

    async def _clamp(
        self, served: CreditChange, short: InsufficientCreditsError, database: Stores
    ) -> None:
        self.clamped += 1
        logger.warning(
            "replayed deduction of %d for %s clamped to the %d credit(s) left",
            short.required,
            served.user_id,
            short.available,
        )
        if short.available > 0 and isinstance(served.change, Deduct):
            clamped = replace(
                served.change,
                amount=short.available,
                description=f"clamped from {short.required}: replayed after an outage",
            )
            attempt = Attempt(served.attempt.at, _derived_key("clamped", served.attempt.key))
            await database.credits.apply(served.user_id, clamped, attempt)


def _derived_key(prefix: str, key: str | None) -> str:
    """A key of its own for a change derived from another, of any length within the column."""
    digest = hashlib.sha256((key or "").encode()).hexdigest()
    return f"{prefix}:{digest}"[:IDEMPOTENCY_KEY_LENGTH]


class _FallingBack:
    def __init__(self, database: Stores, fallback: OutageFallback) -> None:
        self._database = database
        self._fallback = fallback

    async def _either(
        self,
        database: Awaitable[T],
        memory: Callable[[], Awaitable[T]],
        served: Callable[[T], Served | None] | None = None,
    ) -> T:
        """The database's answer; the fallback store's while the database cannot serve,
        with the change it made (`served`, for a write) recorded for the replay, unless
        the outbox is full: then the write is refused as the database refused it. A
        database that answers again gets the outbox replayed."""
        try:
            result = await database
        except StorageUnavailableError as unavailable:
            if served is None:
                return await memory()
            if self._fallback.full:
                raise StorageUnavailableError(
                    "the database is unavailable and the outage outbox is full",
                    retry_after=unavailable.retry_after,
                ) from unavailable
            result = await memory()
            change = served(result)
            if change is not None:
                self._fallback.record(change)
            return result
        self._fallback.replay_soon(self._database)
        return result


class FallbackCredits(_FallingBack):
    """A CreditRepository: the database, or the fallback store while it cannot serve."""

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        return await self._either(
            self._database.credits.apply(user_id, operation, attempt),
            lambda: self._fallback.memory.credits.apply(user_id, operation, attempt),
            None
            if isinstance(operation, Read)
            else lambda _: CreditChange(user_id, operation, attempt),
        )

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        return await self._either(
            self._database.credits.history(user_id, limit),
            lambda: self._fallback.memory.credits.history(user_id, limit),
        )

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        """The database's rows only: the fallback store's go with the outage."""
        return await self._database.credits.delete_transactions_before(cutoff)


class FallbackConsents(_FallingBack):
    """A ConsentRepository: the database, or the fallback store while it cannot serve."""

    async def get(self, user_id: str) -> UserConsent | None:
        return await self._either(
            self._database.consents.get(user_id),
            lambda: self._fallback.memory.consents.get(user_id),
        )

    async def upsert(
        self,
        user_id: str,
        *,
        terms_accepted: bool,
        marketing_consent: bool,
        terms_version: str | None,
        now: datetime,
    ) -> UserConsent:
        def upsert(consents: ConsentRepository) -> Awaitable[UserConsent]:
            return consents.upsert(
                user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                terms_version=terms_version,
                now=now,
            )

        return await self._either(
            upsert(self._database.consents),
            lambda: upsert(self._fallback.memory.consents),
            lambda _: ConsentRecorded(
                user_id, terms_accepted, marketing_consent, terms_version, now
            ),
        )

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        return await self._either(
            self._database.consents.set_marketing(user_id, marketing_consent, now=now),
            lambda: self._fallback.memory.consents.set_marketing(
                user_id, marketing_consent, now=now
            ),
            # Nothing to replay where the fallback store knew no consent (answered 404).
            lambda consent: (
                None if consent is None else MarketingChanged(user_id, marketing_consent, now)
            ),
        )

    async def history(self, user_id: str) -> list[ConsentEvent]:
        """The database's only: the fallback store knows no history from before the
        outage, and a part of it would be a wrong answer (503 instead)."""
        return await self._database.consents.history(user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        return await self._either(
            self._database.consents.page(limit, offset),
            lambda: self._fallback.memory.consents.page(limit, offset),
        )

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        return await self._either(
            self._database.consents.admission(user_id, now=now),
            lambda: self._fallback.memory.consents.admission(user_id, now=now),
        )


def with_fallback(database: Stores, fallback: OutageFallback) -> Stores:
    """Credits and consents fall back to memory; the cache already fails open."""
    return Stores(
        credits=FallbackCredits(database, fallback),
        consents=FallbackConsents(database, fallback),
        cache=database.cache,
    )
