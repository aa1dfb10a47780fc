"""Import of an export stream (SPEC §7), all or nothing.

The whole stream is validated first, line by line, into a spool file
(app/transfer/spool.py); only a stream whose footer agrees with its lines is then carried
in, its erasures first, then its users batch by batch, by the one merge
(app/domain/carry.py) with the hand-over's verification, so importing the same stream
twice changes nothing, and nothing of a user the stream or the store erased comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import msgspec

from app.domain.privacy import is_pseudonym
from app.domain.state import Erasure, Merged
from app.repositories.base import Row, StagedBatch, StateRepository
from app.switching.handover import BATCH_SIZE, HandoverReport
from app.transfer.lines import (
    DECODER,
    FORMAT_2_LINES,
    MAX_LINE_BYTES,
    USERS_OWN,
    AccountLine,
    ConsentLine,
    ErasureLine,
    Footer,
    Header,
    InvalidStreamError,
    KeyLine,
    LedgerLine,
)
from app.transfer.spool import Spool, spooled

# Users per merge of an import, and merges at once.
MERGE_BATCH_SIZE = 5000
MERGES_IN_FLIGHT = 2


# A stream's lines spooled at once.
SPOOL_LINES = 8192


class Staged:
    """A validated stream, spooled and waiting to be carried into its target store."""

    def __init__(
        self,
        spool: Spool,
        target: StateRepository,
        footer: Footer,
        batches: list[StagedBatch],
        erasures: list[Erasure],
        report: HandoverReport,
    ) -> None:
        self._spool = spool
        self._target = target
        self.footer = footer
        self._batches = batches
        self._erasures = erasures
        self._report = report

    @property
    def lines(self) -> int:
        footer = self.footer
        return (
            footer.accounts
            + footer.ledger_rows
            + footer.consents
            + footer.keys
            + footer.consent_events
            + footer.erasures
        )

    async def merge(self, *, progress: Callable[[int], None] | None = None) -> HandoverReport:
        """Carries the stream in, verified user by user: its erasures first, then its users.

        Up to MERGES_IN_FLIGHT batches are merged at once, each its own unit of work
        (StateRepository.merge_rows); a batch naming a user that the batch before names
        waits for it, so that a user's runs are merged in stream order."""
        started = time.perf_counter()
        report = self._report
        merging: list[tuple[asyncio.Future[Merged], StagedBatch]] = []
        done = 0
        for start in range(0, len(self._erasures), BATCH_SIZE):
            part = self._erasures[start : start + BATCH_SIZE]
            report.erased_users += await self._target.merge_erasures(part)
            report.erasures += len(part)
            done += len(part)

        async def settle() -> None:
            """Waits for the oldest batch in flight."""
            nonlocal done
            task, batch = merging.pop(0)
            merged = await task
            report.verification.record(batch.user_ids, merged.mismatched)
            report.merged(merged)
            done += batch.lines
            if progress is not None:
                progress(done)

        try:
            for batch in self._batches:
                while merging and (len(merging) == MERGES_IN_FLIGHT or batch.follows):
                    await settle()
                rows = self._spool.batch(batch.number)
                merging.append((asyncio.ensure_future(self._target.merge_rows(batch, rows)), batch))
            while merging:
                await settle()
        finally:
            for task, _ in merging:  # abandoned on an error: their units of work roll back
                task.cancel()
            for task, _ in merging:
                with contextlib.suppress(BaseException):
                    await task
        report.seconds = time.perf_counter() - started
        return report


@asynccontextmanager
async def staged(chunks: AsyncIterable[bytes], target: StateRepository) -> AsyncIterator[Staged]:
    """Validates a whole stream into a spool, removed when the block ends, to be merged
    into `target`; InvalidStreamError names the first line that is wrong (or the last,
    for a stream cut short), with nothing merged."""
    with spooled() as spool:
        stream = _Validation(spool)
        await stream.read(_lines(chunks))
        yield Staged(spool, target, stream.footer(), stream.batches, stream.erasures, stream.report)


async def _lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[bytes]]:
    """The stream's lines, a chunk's worth at a time."""
    pending = b""
    number = 0
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        number += len(complete)
        yield complete
        if len(pending) > MAX_LINE_BYTES:
            raise InvalidStreamError(number + 1, f"a line longer than {MAX_LINE_BYTES} bytes")
    if pending:
        yield [pending]


class _Validation:
    """Each line of a stream validated and spooled, its user's batch numbered (see
    StagedBatch). The users' lines go to the spool a chunk at a time; the erasures, few,
    are kept here, to be carried first."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.report = HandoverReport()
        self.batches: list[StagedBatch] = []
        self.erasures: list[Erasure] = []
        self.erased: dict[str, datetime] = {}  # the same, by pseudonym: when last
        self.rows: tuple[list[Row], ...] = ([], [], [], [], [])
        self.counted = dict.fromkeys(
            ("accounts", "ledger_rows", "consents", "keys", "consent_events", "erasures"), 0
        )
        self.number_of_batch = 0
        self.batch: dict[str, None] = {}  # the batch's users, in order
        self.accounted: set[str] = set()  # those of the batch whose run has its account
        self.consented: set[str] = set()
        self.batch_lines = 0
        self.follows = False  # the batch names a user of the batch before
        self.before: dict[str, None] = {}  # the users of the batch before
        self.run: str | None = None
        self.run_rows = 0
        self.format = 1
        self.found: Footer | None = None
        self.number = 0

    def footer(self) -> Footer:
        assert self.found is not None
        return self.found

    async def read(self, chunks: AsyncIterator[list[bytes]]) -> None:
        decode = DECODER.decode
        async for lines in chunks:
            for raw in lines:
                self.number += 1
                number = self.number
                if self.found is not None:
                    raise InvalidStreamError(number, "a line after the footer")
                try:
                    line: Any = decode(raw)  # Any: typed by `kind`, without a cast per line
                except msgspec.MsgspecError as error:
                    reason = str(error) if raw.strip() else "an empty line"
                    raise InvalidStreamError(number, reason) from None
                self._take(number, line)
            if sum(map(len, self.rows)) >= SPOOL_LINES:
                self._spool()
        if self.number == 0:
            raise InvalidStreamError(1, "an empty stream")
        if self.found is None:
            raise InvalidStreamError(self.number, "the stream ends without its footer (truncated?)")
        self._spool()
        if self.batch:
            self._close_run()
            self.batches.append(self._closed())

    def _take(self, number: int, line: Any) -> None:
        """One decoded line; a user's lines numbered into its batch."""
        kind = type(line)
        if number == 1 and kind is not Header:
            raise InvalidStreamError(number, "the first line is not a header")
        if kind is Header:
            if number > 1:
                raise InvalidStreamError(number, "a second header")
            self.format = line.format
            return
        if self.format == 1 and kind in FORMAT_2_LINES:
            raise InvalidStreamError(number, f"a {line.__struct_config__.tag} line in format 1")
        if kind is Footer:
            self.found = line
            _check_counts(number, line, self.counted)
            return
        if kind is ErasureLine:
            self.counted["erasures"] += 1
            record = line.record()
            self.erasures.append(record)
            self.erased[record.pseudonym] = max(
                record.erased_at, self.erased.get(record.pseudonym, record.erased_at)
            )
            return
        user_id: str = line.user_id
        if kind in USERS_OWN and is_pseudonym(user_id):
            raise InvalidStreamError(number, "a pseudonym holds ledger rows alone")
        self._enter(user_id, kind)
        self.batch_lines += 1
        accounts, ledger, consents, keys, events = self.rows
        if kind is LedgerLine:
            self.counted["ledger_rows"] += 1
            self.run_rows += 1
            ledger.append(
                (
                    user_id,
                    line.transaction_type,
                    line.amount,
                    line.timestamp,
                    line.description,
                    line.idempotency_key,
                )
            )
        elif kind is AccountLine:
            self.counted["accounts"] += 1
            accounts.append(
                (
                    user_id,
                    line.is_guest,
                    line.available_credits,
                    line.max_credits,
                    line.last_reset_timestamp,
                )
            )
            self.accounted.add(user_id)
        elif kind is ConsentLine:
            self.counted["consents"] += 1
            consents.append(
                (
                    user_id,
                    line.terms_accepted,
                    line.marketing_consent,
                    line.timestamp,
                    line.updated_at,
                    line.terms_version,
                )
            )
            self.consented.add(user_id)
        elif kind is KeyLine:
            self.counted["keys"] += 1
            keys.append(
                (user_id, line.idempotency_key, line.created_at, line.operation, line.request)
            )
        else:
            self.counted["consent_events"] += 1
            events.append(
                (
                    user_id,
                    line.terms_accepted,
                    line.marketing_consent,
                    line.terms_version,
                    line.recorded_at,
                )
            )

    def _enter(self, user_id: str, kind: type) -> None:
        """A new run: another user, or a second account or consent of this one (merged
        after the first, as a run of its own)."""
        if (
            user_id == self.run
            and not (kind is AccountLine and user_id in self.accounted)
            and not (kind is ConsentLine and user_id in self.consented)
        ):
            return
        if self.run is not None:
            self._close_run()
        self.run, self.run_rows = user_id, 0
        if user_id in self.batch or len(self.batch) == MERGE_BATCH_SIZE:
            self._spool()
            self.batches.append(self._closed())
            self.number_of_batch += 1
            self.before, self.batch, self.batch_lines, self.follows = self.batch, {}, 0, False
            self.accounted, self.consented = set(), set()
        if user_id in self.before:
            self.follows = True
        self.batch[user_id] = None

    def _close_run(self) -> None:
        run = self.run
        assert run is not None
        ledger_rows = self.report.ledger_rows
        ledger_rows[run] = ledger_rows.get(run, 0) + self.run_rows

    def _spool(self) -> None:
        if any(self.rows):
            self.spool.write(self.number_of_batch, *self.rows)
            self.rows = ([], [], [], [], [])

    def _closed(self) -> StagedBatch:
        """A batch whose last line was read, its users counted in the report."""
        users = self.batch
        self.report.accounts.update(self.accounted)
        self.report.consents.update(self.consented)
        lock = len(self.accounted) < len(users)
        return StagedBatch(
            self.number_of_batch,
            list(users),
            self.batch_lines,
            lock,
            self.follows,
            keys=self.format >= 2,
            erasures=self.erased,
        )


def _check_counts(number: int, footer: Footer, counted: dict[str, int]) -> None:
    stated = {name: getattr(footer, name) for name in counted}
    if stated != counted:
        raise InvalidStreamError(number, f"the footer counts {stated}, the stream holds {counted}")
