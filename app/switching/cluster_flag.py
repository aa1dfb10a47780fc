"""The storage flag as the cluster shares it (SPEC §7, migration 0005): one row in the
database that every replica polls, taken over STORAGE_BACKEND at start-up.

A change made on one replica is stored with the next version once that replica has handed
its state over; every other replica, seeing the newer version, makes the same change and
hands over its own memory state: its changes, carried by the one merge
(app/domain/carry.py), land on top of what the first replicas' writes left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import utc_now
from app.config import StorageBackend
from app.models import StorageFlagRow, table
from app.repositories.sql.base import insert, transaction

logger = logging.getLogger(__name__)
flags = table(StorageFlagRow)


@dataclass(frozen=True)
class StoredFlag:
    backend: StorageBackend
    shadow: StorageBackend | None
    carry_state: bool
    version: int


class FlagStore:
    """The stored flag. Raises what the database raises; callers decide what an
    unreachable database means for them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def load(self) -> StoredFlag | None:
        """None until a flag was first stored."""
        async with transaction(self._engine) as conn:
            row = (await conn.execute(select(flags).where(flags.c.id == 1))).first()
        if row is None:
            return None
        return StoredFlag(
            StorageBackend(row.backend),
            None if row.shadow is None else StorageBackend(row.shadow),
            row.carry_state,
            row.version,
        )

    async def save(self, flag: StoredFlag) -> None:
        """Stores the flag."""
        async with transaction(self._engine) as conn:
            values = {
                "backend": flag.backend.value,
                "shadow": flag.shadow and flag.shadow.value,
                "carry_state": flag.carry_state,
                "version": flag.version,
                "changed_at": utc_now(),
            }
            statement = insert(conn, flags).values(id=1, **values)
            await conn.execute(
                statement.on_conflict_do_update(index_elements=[flags.c.id], set_=values)
            )


class ClusterFlag:
    """This replica's view of the stored flag: the version it follows, the version of the
    next change, and the poll that follows other replicas' changes."""

    def __init__(self, store: FlagStore, *, poll_seconds: float) -> None:
        self.store = store
        self.version = 0
        self._poll_seconds = poll_seconds
        self._polling: asyncio.Task[None] | None = None

    async def next_version(self) -> int | None:
        """The version of a change made here; None when the database cannot tell (the
        change then stays this replica's own)."""
        try:
            async with asyncio.timeout(self._poll_seconds):
                stored = await self.store.load()
        except Exception as error:
            logger.warning("the stored storage flag is out of reach (%s): not shared", error)
            return None
        return (stored.version if stored else 0) + 1

    async def share(self, flag: StoredFlag) -> None:
        """Stores a change this replica made, for the others to follow."""
        try:
            await self.store.save(flag)
        except Exception as error:
            logger.warning("the storage flag could not be stored (%s): not shared", error)
            return
        self.version = flag.version

    async def stored(self) -> StoredFlag | None:
        """The stored flag, None when there is none or the database is out of reach."""
        try:
            async with asyncio.timeout(self._poll_seconds):
                return await self.store.load()
        except Exception as error:
            logger.debug("the stored storage flag is out of reach (%s)", error)
            return None

    def follow(self, apply: Callable[[StoredFlag], Awaitable[None]]) -> None:
        """Polls the stored flag; `apply` gets each newer one."""
        self._polling = asyncio.get_running_loop().create_task(self._poll(apply))

    async def catch_up(self, apply: Callable[[StoredFlag], Awaitable[None]]) -> bool:
        """Applies the stored flag when it is newer than the one followed (`apply` raises
        to leave it for the next poll); True when it did."""
        stored = await self.stored()
        if stored is None or stored.version <= self.version:
            return False
        await apply(stored)
        self.version = stored.version
        return True

    async def _poll(self, apply: Callable[[StoredFlag], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.catch_up(apply)
            except Exception as error:  # the next poll tries again
                logger.warning("following the stored storage flag failed: %s", error)

    async def stop(self) -> None:
        if self._polling is not None:
            self._polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._polling
