"""Where an import's validated rows wait until its whole stream is valid: a temporary file
of pickled chunks of rows (app/repositories/base.py, Row), read back a batch at a time,
in batch order."""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from app.repositories.base import Row, StagedRows

# Held in memory up to this size, then on disk: a large import never sits in memory.
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024


class Spool:
    """Rows written in stream order; `batch` reads them back, batch after batch."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._reading = False
        # Rows read back ahead of their batch: a chunk of the file may span two.
        self._ahead: StagedRows = ([], [], [])

    def write(self, accounts: list[Row], ledger: list[Row], consents: list[Row]) -> None:
        pickle.dump((accounts, ledger, consents), self._file, pickle.HIGHEST_PROTOCOL)

    def batch(self, number: int) -> StagedRows:
        """The batch's rows, reading the file on until a later batch's rows or its end;
        asked for in batch order."""
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


@contextmanager
def spooled() -> Iterator[Spool]:
    """A spool, removed when the block ends."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as file:
        yield Spool(file)
