"""Where an import's validated rows wait until its whole stream is valid: a temporary file
of chunks of rows (app/repositories/base.py, Row), each chunk of one batch, read back a
batch at a time, in batch order.

The chunks are msgspec's MessagePack, not pickle: it writes a chunk of rows in a twentieth
of pickle's time and reads it back in two thirds. Its timestamps come back in UTC, the
same instants as were written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import msgspec

from app.repositories.base import Row, StagedRows

# Held in memory up to this size, then on disk: a large import never sits in memory.
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024

_Chunk = tuple[int, list[Row], list[Row], list[Row], list[Row], list[Row]]
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Chunk)
_LENGTH = 4  # bytes of a chunk's length, before it


class Spool:
    """Rows written in stream order; `batch` reads them back, batch after batch."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._reading = False
        # A chunk read back ahead of its batch: the first of the next batch.
        self._ahead: _Chunk | None = None

    def write(self, batch: int, *rows: list[Row]) -> None:
        """A chunk of the batch's rows (StagedRows' lists), after the chunks of batches
        before it."""
        chunk = _ENCODER.encode((batch, *rows))
        self._file.write(len(chunk).to_bytes(_LENGTH, "big"))
        self._file.write(chunk)

    def batch(self, number: int) -> StagedRows:
        """The batch's rows, reading the file on until a later batch's chunk or its end;
        asked for in batch order."""
        if not self._reading:
            self._file.seek(0)
            self._reading = True
        found: StagedRows = ([], [], [], [], [])
        while (chunk := self._ahead or self._read()) is not None:
            self._ahead = None
            if chunk[0] != number:
                self._ahead = chunk
                break
            for kept, rows in zip(found, chunk[1:], strict=True):
                kept.extend(rows)
        return found

    def _read(self) -> _Chunk | None:
        length = self._file.read(_LENGTH)
        if not length:
            return None
        return _DECODER.decode(self._file.read(int.from_bytes(length, "big")))


@contextmanager
def spooled() -> Iterator[Spool]:
    """A spool, removed when the block ends."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as file:
        yield Spool(file)
