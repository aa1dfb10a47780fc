"""Export and import of a store's state as NDJSON (SPEC §7).

A stream is a header line, then each user's lines together (its account, its ledger rows,
its consent), then a footer with the counts. An import is all or nothing: the whole
stream is validated first, line by line, into a spool file (app/storage/spool.py); only a
stream whose footer agrees with its lines is then merged, batch by batch, with the
hand-over's merge and verification, so importing the same stream twice changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal, cast

import msgspec

from app.clock import utc_now
from app.domain.credits import CreditRules
from app.domain.state import Merged
from app.errors import AppError
from app.models import IDEMPOTENCY_KEY_LENGTH, TERMS_VERSION_LENGTH, USER_ID_LENGTH
from app.repositories.base import Row, StagedBatch, StateRepository
from app.schemas import TransactionType
from app.storage.handover import BATCH_SIZE, HandoverReport
from app.storage.spool import Spool, spooled

FORMAT = 1
# No line of ours comes near it (a description is the longest field); it bounds what an
# import buffers.
MAX_LINE_BYTES = 1024 * 1024
# Users per merge of an import, and merges at once.
MERGE_BATCH_SIZE = 5000
MERGES_IN_FLIGHT = 2

# The lines are read with msgspec, not pydantic: an import validates every line of a
# stream of millions, and msgspec decodes and checks one in a quarter of the time.
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=USER_ID_LENGTH)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=IDEMPOTENCY_KEY_LENGTH)]
Version = Annotated[str, msgspec.Meta(min_length=1, max_length=TERMS_VERSION_LENGTH)]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]


class _Line(msgspec.Struct, forbid_unknown_fields=True, tag_field="kind"):
    pass


class Header(_Line, tag="header"):
    format: Literal[1]
    store: str
    exported_at: Instant


class AccountLine(_Line, tag="account"):
    user_id: UserId
    is_guest: bool
    available_credits: Annotated[int, msgspec.Meta(ge=0)]
    max_credits: Annotated[int, msgspec.Meta(gt=0)]
    last_reset_timestamp: Instant
    next_reset_at: Instant | None = None  # derived; shown, not read

    def __post_init__(self) -> None:
        if self.available_credits > self.max_credits:
            raise ValueError("available_credits exceeds max_credits")


class LedgerLine(_Line, tag="ledger"):
    id: int
    user_id: UserId
    transaction_type: TransactionType
    amount: int
    timestamp: Instant
    description: str | None = None
    idempotency_key: Key | None = None

    def __post_init__(self) -> None:
        if self.amount == 0:
            raise ValueError("a ledger row of 0 credits")


class ConsentLine(_Line, tag="consent"):
    user_id: UserId
    terms_accepted: bool
    marketing_consent: bool
    timestamp: Instant
    updated_at: Instant
    # Absent from streams written before terms were versioned (SPEC §10).
    terms_version: Version | None = None


class Footer(_Line, tag="footer"):
    accounts: Annotated[int, msgspec.Meta(ge=0)]
    ledger_rows: Annotated[int, msgspec.Meta(ge=0)]
    consents: Annotated[int, msgspec.Meta(ge=0)]


_DECODER = msgspec.json.Decoder(Header | AccountLine | LedgerLine | ConsentLine | Footer)
# And an export's lines written by msgspec, a batch of users' lines in one call: a twentieth of
# the json module's time. Its timestamps are RFC 3339, UTC written `Z`, as the API's are.
_ENCODER = msgspec.json.Encoder()


class InvalidStreamError(AppError):
    status_code = 422
    code = "invalid_stream"

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}; nothing was imported")
        self.line = line

    @property
    def details(self) -> Any:
        return {"line": self.line}


# Export.


async def export_lines(
    state: StateRepository, rules: CreditRules, store: str
) -> AsyncIterator[bytes]:
    """The store's users as NDJSON lines, a batch of users read at a time."""
    header = {"kind": "header", "format": FORMAT, "store": store, "exported_at": utc_now()}
    yield _ENCODER.encode_lines([header])
    counts = {"accounts": 0, "ledger_rows": 0, "consents": 0}
    async for user_ids in state.user_ids(BATCH_SIZE):
        lines: list[dict[str, Any]] = []
        for user in await state.read(user_ids):
            if user.account is not None:
                view = rules.view(user.account)
                lines.append({"kind": "account", **view.model_dump()})
                counts["accounts"] += 1
            lines.extend({"kind": "ledger", **row.fields()} for row in user.ledger)
            counts["ledger_rows"] += len(user.ledger)
            if user.consent is not None:
                lines.append({"kind": "consent", **user.consent.model_dump()})
                counts["consents"] += 1
        yield _ENCODER.encode_lines(lines)
    yield _ENCODER.encode_lines([{"kind": "footer", **counts}])


# Import.


# A stream's lines spooled at once.
SPOOL_LINES = 8192


class Staged:
    """A validated stream, spooled and waiting to be merged into its target store."""

    def __init__(
        self,
        spool: Spool,
        target: StateRepository,
        footer: Footer,
        batches: list[StagedBatch],
        report: HandoverReport,
    ) -> None:
        self._spool = spool
        self._target = target
        self.footer = footer
        self._batches = batches
        self._report = report

    @property
    def lines(self) -> int:
        return self.footer.accounts + self.footer.ledger_rows + self.footer.consents

    async def merge(self, *, progress: Callable[[int], None] | None = None) -> HandoverReport:
        """Merges the stream, verified user by user.

        Up to MERGES_IN_FLIGHT batches are merged at once, each its own unit of work
        (StateRepository.merge_rows); a batch naming a user that the batch before names
        waits for it, so that a user's runs are merged in stream order."""
        started = time.perf_counter()
        report = self._report
        merging: list[tuple[asyncio.Future[Merged], StagedBatch]] = []
        done = 0

        async def settle() -> None:
            """Waits for the oldest batch in flight."""
            nonlocal done
            task, batch = merging.pop(0)
            merged = await task
            report.verification.record(batch.user_ids, merged.mismatched)
            report.ledger_rows_added += merged.added
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
        footer, batches, report = await _validated(_lines(chunks), spool)
        yield Staged(spool, target, footer, batches, report)


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


async def _validated(
    chunks: AsyncIterator[list[bytes]], spool: Spool
) -> tuple[Footer, list[StagedBatch], HandoverReport]:
    """Each line validated and spooled, its user's batch numbered (see StagedBatch); one
    function of plain locals, since it runs for every line of a stream of millions."""
    report = HandoverReport()
    accounts: list[Row] = []
    ledger: list[Row] = []
    consents: list[Row] = []
    account_lines = ledger_lines = consent_lines = 0
    batches: list[StagedBatch] = []
    number_of_batch = 0
    batch: dict[str, None] = {}  # the batch's users, in order
    accounted: set[str] = set()  # those of the batch whose run has its account
    consented: set[str] = set()
    batch_lines = 0
    follows = False  # the batch names a user of the batch before
    before: dict[str, None] = {}  # the users of the batch before
    run: str | None = None
    run_rows = 0
    ledger_rows = report.ledger_rows
    footer: Footer | None = None
    number = 0
    decode = _DECODER.decode
    async for lines in chunks:
        for raw in lines:
            number += 1
            if footer is not None:
                raise InvalidStreamError(number, "a line after the footer")
            try:
                line: Any = decode(raw)  # Any: typed by `kind`, without a cast per line
            except msgspec.MsgspecError as error:
                reason = str(error) if raw.strip() else "an empty line"
                raise InvalidStreamError(number, reason) from None
            kind = type(line)
            if number == 1 and kind is not Header:
                raise InvalidStreamError(number, "the first line is not a header")
            if kind is Header:
                if number > 1:
                    raise InvalidStreamError(number, "a second header")
                continue
            if kind is Footer:
                footer = line
                _check_counts(number, line, (account_lines, ledger_lines, consent_lines))
                continue
            user_id: str = line.user_id
            # A new run: another user, or a second account or consent of this one (merged
            # after the first, as a run of its own).
            if (
                user_id != run
                or (kind is AccountLine and user_id in accounted)
                or (kind is ConsentLine and user_id in consented)
            ):
                if run is not None:
                    ledger_rows[run] = ledger_rows.get(run, 0) + run_rows
                run, run_rows = user_id, 0
                if user_id in batch or len(batch) == MERGE_BATCH_SIZE:
                    spool.write(number_of_batch, accounts, ledger, consents)
                    accounts, ledger, consents = [], [], []
                    batches.append(
                        _closed(
                            number_of_batch,
                            batch,
                            accounted,
                            consented,
                            batch_lines,
                            follows,
                            report,
                        )
                    )
                    number_of_batch += 1
                    before, batch, batch_lines, follows = batch, {}, 0, False
                    accounted, consented = set(), set()
                if user_id in before:
                    follows = True
                batch[user_id] = None
            batch_lines += 1
            if kind is LedgerLine:
                ledger_lines += 1
                run_rows += 1
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
                account_lines += 1
                accounts.append(
                    (
                        user_id,
                        line.is_guest,
                        line.available_credits,
                        line.max_credits,
                        line.last_reset_timestamp,
                    )
                )
                accounted.add(user_id)
            else:
                consent_lines += 1
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
                consented.add(user_id)
        if len(accounts) + len(ledger) + len(consents) >= SPOOL_LINES:
            spool.write(number_of_batch, accounts, ledger, consents)
            accounts, ledger, consents = [], [], []
    if number == 0:
        raise InvalidStreamError(1, "an empty stream")
    if footer is None:
        raise InvalidStreamError(number, "the stream ends without its footer (truncated?)")
    if accounts or ledger or consents:
        spool.write(number_of_batch, accounts, ledger, consents)
    if batch:
        ledger_rows[cast(str, run)] = ledger_rows.get(cast(str, run), 0) + run_rows
        batches.append(
            _closed(number_of_batch, batch, accounted, consented, batch_lines, follows, report)
        )
    return footer, batches, report


def _closed(
    number: int,
    users: dict[str, None],
    accounted: set[str],
    consented: set[str],
    lines: int,
    follows: bool,
    report: HandoverReport,
) -> StagedBatch:
    """A batch whose last line was read, its users counted in the report."""
    report.accounts.update(accounted)
    report.consents.update(consented)
    return StagedBatch(number, list(users), lines, len(accounted) < len(users), follows)


def _check_counts(number: int, footer: Footer, counted: tuple[int, int, int]) -> None:
    stated = {"accounts": footer.accounts, "ledger_rows": footer.ledger_rows}
    stated["consents"] = footer.consents
    found = dict(zip(stated, counted, strict=True))
    if stated != found:
        raise InvalidStreamError(number, f"the footer counts {stated}, the stream holds {found}")
