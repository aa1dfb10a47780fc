"""Changing which store serves (SPEC §7, §9): the flag set here or followed from another
replica, the hand-over that carries the old primary's users, and recovery first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from app.config import StorageBackend
from app.domain.state import Tally
from app.errors import JournalPendingError, StorageUnavailableError
from app.repositories.base import StateRepository
from app.switching.cluster_flag import ClusterFlag, StoredFlag
from app.switching.handover import HandoverInProgressError, HandoverReport, hand_over
from app.switching.provider import StorageProvider
from app.switching.routing import WriteGate
from app.switching.shadow import Shadow

logger = logging.getLogger(__name__)


class StoreSwitching:
    """Sets the storage flag (primary and shadow) for this process and shares it with
    the other replicas. One change of the flag, or one import, at a time (`exclusive`).

    `prepare_database`: migrate and check the schema (StorageUnavailableError when the
    database cannot serve). `journal_depth` and `replay_journal`: the outage journal's
    changes still waiting, and their replay; None without an outage fallback.
    `carried`: the running totals of what every hand-over carried."""

    def __init__(
        self,
        storage: StorageProvider,
        states: dict[StorageBackend, StateRepository],
        *,
        gate: WriteGate,
        shadow: Shadow,
        cluster: ClusterFlag,
        carried: Tally,
        prepare_database: Callable[[], Awaitable[None]],
        journal_depth: Callable[[], int],
        replay_journal: Callable[[], Awaitable[object]],
    ) -> None:
        self._storage = storage
        self._states = states
        self._gate = gate
        self._shadow = shadow
        self._cluster = cluster
        self._carried = carried
        self._prepare_database = prepare_database
        self._journal_depth = journal_depth
        self._replay_journal = replay_journal
        self._changing = asyncio.Lock()

    async def switch(
        self,
        backend: StorageBackend,
        shadow: StorageBackend | None = None,
        *,
        carry_state: bool = True,
        followed: StoredFlag | None = None,
    ) -> HandoverReport | None:
        """Set the flag: the primary and the shadow. A database among them must answer at
        the schema head first, and a new primary waits for the outage journal's replay
        (JournalPendingError while changes still wait). With `carry_state`, a new primary
        gets the old one's users first, or else a new shadow the primary's
        (app/switching/handover.py), and the report says what was carried;
        HandoverFailedError leaves the flag. HandoverInProgressError while another change
        runs. The change is stored for the other replicas to follow
        (app/switching/cluster_flag.py), unless it is one they made: `followed`."""
        async with self.exclusive():
            if StorageBackend.DATABASE in (backend, shadow):
                await self._prepare_database()
            storage = self._storage
            old, old_shadow = storage.backend, storage.shadow
            if backend is not old:
                await self._journal_replayed()
            version = (
                followed.version if followed is not None else await self._cluster.next_version()
            )

            def flip() -> None:
                storage.switch(backend, shadow)
                if shadow is not old_shadow:
                    self._shadow.restart()
                logger.info(
                    "storage flag set: primary %s, shadow %s",
                    backend.value,
                    shadow.value if shadow else None,
                )

            report = None
            if carry_state and backend is not old:
                report = await self._hand_over(old, backend, flip)
            elif carry_state and shadow is not None and shadow is not old_shadow:
                report = await self._hand_over(backend, shadow, flip)
            else:
                flip()
            if followed is None and version is not None:
                await self._cluster.share(StoredFlag(backend, shadow, carry_state, version))
            return report

    async def take_stored_flag(self) -> None:
        """At start-up: the stored flag over STORAGE_BACKEND when the database has one
        (there is no state in memory yet to carry); then follow the changes others make."""
        stored = await self._cluster.stored()
        if stored is not None:
            try:
                if StorageBackend.DATABASE in (stored.backend, stored.shadow):
                    await self._prepare_database()
            except StorageUnavailableError as error:
                logger.warning("the stored storage flag cannot be taken (%s)", error.message)
            else:
                if self._journal_depth() and stored.backend is not self._storage.backend:
                    # Recovery before a change of primary: the poll follows the flag once
                    # the journal's replay has carried what waits (`switch`).
                    logger.warning(
                        "storage flag version %d waits for the outage journal's replay",
                        stored.version,
                    )
                else:
                    self._storage.switch(stored.backend, stored.shadow)
                    self._cluster.version = stored.version
                    logger.info("storage flag version %d taken from the database", stored.version)
        self._cluster.follow(self._follow)

    async def follow_cluster(self) -> bool:
        """Makes the change another replica stored, if there is a newer one, now rather
        than at the next poll; True when there was."""
        return await self._cluster.catch_up(self._follow)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """One flag change or import at a time; HandoverInProgressError for another."""
        if self._changing.locked():
            raise HandoverInProgressError()
        async with self._changing:
            yield

    async def _follow(self, stored: StoredFlag) -> None:
        await self.switch(
            stored.backend, stored.shadow, carry_state=stored.carry_state, followed=stored
        )

    async def _journal_replayed(self) -> None:
        """Recovery before a change of primary (SPEC §9): the outage journal replayed
        first, or JournalPendingError (409) while changes still wait."""
        if not self._journal_depth():
            return
        await self._replay_journal()
        if depth := self._journal_depth():
            raise JournalPendingError(depth)

    async def _hand_over(
        self, source: StorageBackend, target: StorageBackend, flip: Callable[[], None]
    ) -> HandoverReport:
        report = await hand_over(self._states[source], self._states[target], self._gate, flip)
        self._carried.add(report.tally)
        logger.info(
            "state handed over from %s to %s: %s", source.value, target.value, report.body()
        )
        return report
