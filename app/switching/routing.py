"""Calls routed to the store the flag picks at the moment they run, through the write gate,
and to the shadow when there is one (app/switching/shadow.py).

A request picks its services when it starts; a write it makes passes the gate first and
only then looks up the primary. So a write held during a hand-over's final step goes to
the new primary once released, never to the old one after its state was copied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any, assert_never

from app.domain.consents import ChangeMarketing, ConsentChange, RecordConsent
from app.domain.credits import Attempt, Operation, operation_name
from app.errors import InsufficientCreditsError, StorageUnavailableError
from app.repositories.base import Stores
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits
from app.switching.provider import StorageProvider
from app.switching.shadow import Answer, Shadow

logger = logging.getLogger(__name__)


class WriteGate:
    """Where every credit and consent write passes on its way to the primary. A hand-over
    watches which users writes touch, and for its final step holds new writes and waits
    out those in flight. Reads do not pass it."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._touched: set[str] | None = None

    async def enter(self, user_id: str) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        if self._touched is not None:
            self._touched.add(user_id)

    def leave(self, user_id: str) -> None:
        # Noted on leaving too: a write that entered before the watch began may land
        # after the hand-over read its user.
        if self._touched is not None:
            self._touched.add(user_id)
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @contextmanager
    def watching(self) -> Iterator[Touched]:
        """Notes every user a write touches while the block runs."""
        touched = Touched(set())
        self._touched = touched.users
        try:
            yield touched
        finally:
            self._touched = None

    @asynccontextmanager
    async def holding(self, drain_seconds: float) -> AsyncIterator[None]:
        """Holds new writes while the block runs, after those in flight have finished;
        StorageUnavailableError when they do not finish within `drain_seconds`."""
        self._open.clear()
        try:
            try:
                async with asyncio.timeout(drain_seconds):
                    await self._idle.wait()
            except TimeoutError:
                raise StorageUnavailableError(
                    "writes in flight did not finish; the hand-over was abandoned"
                ) from None
            yield
        finally:
            self._open.set()


class Touched:
    """The users written since the watch began or the last `take`."""

    def __init__(self, users: set[str]) -> None:
        self.users = users

    def take(self) -> list[str]:
        taken = sorted(self.users)
        self.users.clear()
        return taken


class RoutedCredits:
    """The primary's CreditRepository, writes through the gate, and then the shadow's."""

    def __init__(self, provider: StorageProvider, gate: WriteGate, shadow: Shadow) -> None:
        self._provider = provider
        self._gate = gate
        self._shadow = shadow

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        # Every operation, a Read too: first sight and a due reset write.
        await self._gate.enter(user_id)
        try:
            shadow = self._shadow.stores
            try:
                answer = await self._provider.stores.credits.apply(user_id, operation, attempt)
            except InsufficientCreditsError as refusal:
                if shadow is not None:
                    await self._shadowed(shadow, user_id, operation, attempt, refusal)
                raise
            if shadow is not None:
                await self._shadowed(shadow, user_id, operation, attempt, answer)
            return answer
        finally:
            self._gate.leave(user_id)

    async def _shadowed(
        self, shadow: Stores, user_id: str, operation: Operation, attempt: Attempt, primary: Answer
    ) -> None:
        name = operation_name(type(operation))
        # The same instant and key; a fresh `sent`, which concerns the primary's database.
        again = Attempt(attempt.at, attempt.key, own_key=attempt.own_key)
        answer: Answer
        try:
            answer = await shadow.credits.apply(user_id, operation, again)
        except InsufficientCreditsError as refusal:
            answer = refusal
        except Exception as error:
            self._shadow.failed(user_id, name, error)
            return
        if self._shadow.sampled():
            self._shadow.compare(user_id, name, primary, answer)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        return await self._provider.stores.credits.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        deleted = await self._provider.stores.credits.delete_transactions_before(cutoff)
        shadow = self._shadow.stores
        if shadow is not None:
            try:
                await shadow.credits.delete_transactions_before(cutoff)
            except Exception as error:  # retention runs again; nothing for a repair to do
                logger.warning("shadow retention failed (%s)", error)
        return deleted


class RoutedConsents:
    """The primary's ConsentRepository, writes through the gate, and then the shadow's."""

    def __init__(self, provider: StorageProvider, gate: WriteGate, shadow: Shadow) -> None:
        self._provider = provider
        self._gate = gate
        self._shadow = shadow

    async def get(self, user_id: str) -> UserConsent | None:
        answer = await self._provider.stores.consents.get(user_id)
        shadow = self._shadow.stores
        if shadow is not None and self._shadow.sampled():
            try:
                seen = await shadow.consents.get(user_id)
            except Exception as error:
                self._shadow.failed(user_id, "get_consent", error)
            else:
                self._shadow.compare(user_id, "get_consent", answer, seen)
        return answer

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        await self._gate.enter(user_id)
        try:
            answer = await self._provider.stores.consents.apply(user_id, change, now=now)
            shadow = self._shadow.stores
            if shadow is not None:
                await self._compared(
                    user_id,
                    _shadow_name(change),
                    answer,
                    shadow.consents.apply(user_id, change, now=now),
                )
            return answer
        finally:
            self._gate.leave(user_id)

    async def _compared(
        self,
        user_id: str,
        operation: str,
        primary: UserConsent | None,
        write: Coroutine[Any, Any, UserConsent | None],
    ) -> None:
        try:
            answer = await write
        except Exception as error:
            self._shadow.failed(user_id, operation, error)
            return
        if self._shadow.sampled():
            self._shadow.compare(user_id, operation, primary, answer)

    async def history(self, user_id: str) -> list[ConsentEvent]:
        return await self._provider.stores.consents.history(user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        return await self._provider.stores.consents.page(limit, offset)

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        return await self._provider.stores.consents.admission(user_id, now=now)


def _shadow_name(change: ConsentChange) -> str:
    """The operation a shadow sample names: the consent writes' names from before `apply`."""
    match change:
        case RecordConsent():
            return "upsert_consent"
        case ChangeMarketing():
            return "set_marketing"
        case _:
            assert_never(change)
