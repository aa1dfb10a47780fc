"""An import's staging: the validated rows wait in a temporary file, and each batch is read
back from it, in batch order, and handed to the store's merge of such rows."""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import IO

from app.domain.credits import Account
from app.domain.state import LedgerRecord, Merged, UserState
from app.repositories.base import ImportStaging, Row, StagedBatch, StagedRows, StateRepository
from app.schemas import UserConsent

# Spooled in memory up to this size, then on disk: a large import never sits in memory.
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024

MergeRows = Callable[[StagedBatch, StagedRows], Awaitable[Merged]]


@asynccontextmanager
async def spool_staging(merge: MergeRows) -> AsyncIterator[ImportStaging]:
    """Staging in a temporary file, removed when the block ends; `merge` merges a batch's
    rows, verified, as one unit of work."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as file:
        yield _Spool(file, merge)


def merging_states(target: StateRepository) -> MergeRows:
    """A batch's rows merged as users, by `merge_verified`: for a store that merges users."""

    async def merge(batch: StagedBatch, rows: StagedRows) -> Merged:
        return await target.merge_verified(_states(batch, rows))

    return merge


class _Spool:
    def __init__(self, file: IO[bytes], merge: MergeRows) -> None:
        self._file = file
        self._merge = merge
        self._reading = False
        # Rows read back ahead of their batch: a chunk of the file may span two.
        self._ahead: StagedRows = ([], [], [])
        # Each batch's rows from when first asked for until merged: a merge retried
        # (app/storage/guarded.py) asks again.
        self._held: dict[int, StagedRows] = {}

    async def stage(self, accounts: list[Row], ledger: list[Row], consents: list[Row]) -> None:
        pickle.dump((accounts, ledger, consents), self._file, pickle.HIGHEST_PROTOCOL)

    async def flush(self) -> None:
        self._file.flush()

    def merge(self, batch: StagedBatch) -> Awaitable[Merged]:
        # Read now, in the caller's order; merged when awaited.
        rows = self._held.get(batch.number)
        if rows is None:
            rows = self._held[batch.number] = self._rows(batch.number)
        return self._merged(batch, rows)

    async def _merged(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        merged = await self._merge(batch, rows)
        del self._held[batch.number]
        return merged

    def _rows(self, number: int) -> StagedRows:
        """The batch's rows, reading the file on until a later batch's rows or its end."""
        if not self._reading:
            self._file.seek(0)
            self._reading = True
        found: StagedRows = ([], [], [])
        pending = self._ahead
        while True:
            later = False
            for kept, rows in zip(found, pending, strict=True):
                kept.extend(row for row in rows if row[0] == number)
                later = later or (bool(rows) and rows[-1][0] > number)
            if later:
                self._ahead = pending
                return found
            try:
                pending = pickle.load(self._file)
            except EOFError:
                self._ahead = ([], [], [])
                return found


def _states(batch: StagedBatch, rows: StagedRows) -> list[UserState]:
    accounts, ledger, consents = rows
    account_of = {row[1]: Account(*row[1:]) for row in accounts}
    ledger_of: dict[str, list[LedgerRecord]] = {}
    for row in ledger:
        ledger_of.setdefault(row[2], []).append(LedgerRecord(*row[2:]))
    consent_of = {row[1]: _consent(row) for row in consents}
    return [
        UserState(
            user_id,
            account_of.get(user_id),
            tuple(ledger_of.get(user_id, ())),
            consent_of.get(user_id),
        )
        for user_id in batch.user_ids
    ]


def _consent(row: Row) -> UserConsent:
    _, user_id, terms_accepted, marketing_consent, timestamp, updated_at, version = row
    return UserConsent(
        user_id=user_id,
        terms_accepted=terms_accepted,
        marketing_consent=marketing_consent,
        timestamp=timestamp,
        updated_at=updated_at,
        terms_version=version,
    )
