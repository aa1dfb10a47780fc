"""The in-memory fallback (DB_OUTAGE_FALLBACK=memory) and its outbox.

While the database cannot serve, credit and consent calls are served by an
in-memory store of their own. Every change made there goes into an outbox, in
order, and is replayed into the database once it answers again. Credit changes
carry their idempotency key into the replay, so each is applied exactly once,
however often a replay is interrupted and resumed. A deduction that no longer fits
the database balance is clamped to what is left and logged, never dropped silently.

The outbox lives in process memory: if the process dies during an outage, the
changes made since the outage began are lost (README, "When the database is down").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from app.errors import InsufficientCreditsError, StorageUnavailableError
from app.repositories.base import ConsentRepository, CreditRepository, Stores
from app.resilience import retrying

logger = logging.getLogger(__name__)

# The calls that change something, per store; everything else is a read.
WRITES = {
    "credits": frozenset({"deduct", "refund", "upgrade", "reset"}),
    "consents": frozenset({"upsert", "set_marketing"}),
}


@dataclass(frozen=True)
class Change:
    """One change served by the fallback, as the call that made it."""

    store: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class OutageFallback:
    """Owns the fallback store, the outbox and the replay."""

    def __init__(self, make_memory: Callable[[], Stores]) -> None:
        self._make_memory = make_memory
        self.memory = make_memory()
        self.outbox: list[Change] = []
        self.clamped = 0
        self.replayed = 0
        self._lock = asyncio.Lock()
        self._replay_task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self.outbox)

    def record(self, change: Change) -> None:
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
                change = self.outbox[0]
                try:
                    await self._apply(change, database)
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

    async def _apply(self, change: Change, database: Stores) -> None:
        method = getattr(getattr(database, change.store), change.method)
        try:
            # The database may have applied it before it stopped answering.
            with retrying():
                await method(*change.args, **change.kwargs)
        except InsufficientCreditsError as short:
            await self._clamp(change, short, database)

    async def _clamp(
        self, change: Change, short: InsufficientCreditsError, database: Stores
    ) -> None:
        user_id, amount = change.args[0], change.args[1]
        self.clamped += 1
        logger.warning(
            "replayed deduction of %d for %s clamped to the %d credit(s) left",
            amount,
            user_id,
            short.available,
        )
        if short.available > 0:
            kwargs = {
                **change.kwargs,
                "idempotency_key": f"{change.kwargs['idempotency_key']}:clamped",
                "description": f"clamped from {amount}: replayed after an outage",
            }
            await database.credits.deduct(user_id, short.available, **kwargs)


class _WithFallback:
    """One repository: the database first; the fallback store when it cannot serve."""

    def __init__(self, store: str, database: Stores, fallback: OutageFallback) -> None:
        self._store = store
        self._database = database
        self._fallback = fallback

    def __getattr__(self, name: str) -> Any:
        primary = getattr(getattr(self._database, self._store), name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await primary(*args, **kwargs)
            except StorageUnavailableError:
                secondary = getattr(getattr(self._fallback.memory, self._store), name)
                result = await secondary(*args, **kwargs)
                if name in WRITES[self._store]:
                    self._fallback.record(Change(self._store, name, args, kwargs))
                return result
            self._fallback.replay_soon(self._database)
            return result

        return call


def with_fallback(database: Stores, fallback: OutageFallback) -> Stores:
    """Credits and consents fall back to memory; the cache already fails open."""
    return Stores(
        credits=cast(CreditRepository, _WithFallback("credits", database, fallback)),
        consents=cast(ConsentRepository, _WithFallback("consents", database, fallback)),
        cache=database.cache,
    )
