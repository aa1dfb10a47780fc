"""Export and import of a store's state as NDJSON (SPEC §7).

A stream is a header line, then each user's lines together (its account, its ledger rows,
its consent), then a footer with the counts. An import is all or nothing: the whole
stream is validated first, line by line, into a spool file; only a stream whose footer
agrees with its lines is then merged, with the hand-over's merge and verification, so
importing the same stream twice changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import IO, Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from app.clock import utc_now
from app.domain.credits import Account, CreditRules
from app.domain.state import LedgerRecord, UserState
from app.errors import AppError
from app.models import IDEMPOTENCY_KEY_LENGTH, USER_ID_LENGTH
from app.repositories.base import StateRepository
from app.schemas import TransactionType, UserConsent
from app.storage.handover import BATCH_SIZE, HandoverReport, copy_states

FORMAT = 1
# Spooled in memory up to this size, then on disk: a large import never sits in memory.
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024
# No line of ours comes near it (a description is the longest field); it bounds what an
# import buffers.
MAX_LINE_BYTES = 1024 * 1024
# Users per merge of an import, and merges at once.
MERGE_BATCH_SIZE = 5000
MERGES_IN_FLIGHT = 2

UserId = Annotated[str, StringConstraints(min_length=1, max_length=USER_ID_LENGTH)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=IDEMPOTENCY_KEY_LENGTH)]


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Header(_Line):
    kind: Literal["header"]
    format: Literal[1]
    store: str
    exported_at: AwareDatetime


class AccountLine(_Line):
    kind: Literal["account"]
    user_id: UserId
    is_guest: bool
    available_credits: int = Field(ge=0)
    max_credits: int = Field(gt=0)
    last_reset_timestamp: AwareDatetime
    next_reset_at: AwareDatetime | None = None  # derived; shown, not read

    @model_validator(mode="after")
    def _within_maximum(self) -> AccountLine:
        if self.available_credits > self.max_credits:
            raise ValueError("available_credits exceeds max_credits")
        return self


class LedgerLine(_Line):
    kind: Literal["ledger"]
    id: int
    user_id: UserId
    transaction_type: TransactionType
    amount: int
    timestamp: AwareDatetime
    description: str | None = None
    idempotency_key: Key | None = None

    @model_validator(mode="after")
    def _not_zero(self) -> LedgerLine:
        if self.amount == 0:
            raise ValueError("a ledger row of 0 credits")
        return self


class ConsentLine(_Line):
    kind: Literal["consent"]
    user_id: UserId
    terms_accepted: bool
    marketing_consent: bool
    timestamp: AwareDatetime
    updated_at: AwareDatetime
    # Absent from streams written before terms were versioned (SPEC §10).
    terms_version: str | None = Field(None, min_length=1, max_length=32)


class Footer(_Line):
    kind: Literal["footer"]
    accounts: int = Field(ge=0)
    ledger_rows: int = Field(ge=0)
    consents: int = Field(ge=0)


Line = Annotated[
    Header | AccountLine | LedgerLine | ConsentLine | Footer, Field(discriminator="kind")
]
_LINE: TypeAdapter[Header | AccountLine | LedgerLine | ConsentLine | Footer] = TypeAdapter(Line)


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
    yield _encoded(header)
    counts = {"accounts": 0, "ledger_rows": 0, "consents": 0}
    async for user_ids in state.user_ids(BATCH_SIZE):
        lines = []
        for user in await state.read(user_ids):
            if user.account is not None:
                view = rules.view(user.account)
                lines.append(_encoded({"kind": "account", **view.model_dump()}))
                counts["accounts"] += 1
            for row in user.ledger:
                lines.append(_encoded({"kind": "ledger", **row.fields()}))
            counts["ledger_rows"] += len(user.ledger)
            if user.consent is not None:
                lines.append(_encoded({"kind": "consent", **user.consent.model_dump()}))
                counts["consents"] += 1
        yield b"".join(lines)
    yield _encoded({"kind": "footer", **counts})


def _encoded(line: dict[str, Any]) -> bytes:
    return json.dumps(line, default=_iso, separators=(",", ":")).encode() + b"\n"


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


# Import.


# The spool holds the validated lines as pickled lists of tuples (_spooled_row), a list
# per this many lines: read back without being parsed or validated again.
SPOOL_CHUNK_LINES = 512
_ACCOUNT, _LEDGER, _CONSENT = 0, 1, 2


class Spooled:
    """A validated stream, waiting in a temporary file to be merged."""

    def __init__(self, spool: IO[bytes], footer: Footer) -> None:
        self._spool = spool
        self.footer = footer

    @property
    def lines(self) -> int:
        return self.footer.accounts + self.footer.ledger_rows + self.footer.consents

    def users(self) -> Iterator[UserState]:
        """The users in stream order, one state per run of a user's lines."""
        self._spool.seek(0)
        user_id: str | None = None
        account: Account | None = None
        ledger: list[LedgerRecord] = []
        consent: UserConsent | None = None
        while True:
            try:
                rows: list[tuple[Any, ...]] = pickle.load(self._spool)
            except EOFError:
                break
            for row in rows:
                if row[1] != user_id:
                    if user_id is not None:
                        yield UserState(user_id, account, tuple(ledger), consent)
                    user_id, account, ledger, consent = row[1], None, [], None
                kind = row[0]
                if kind == _LEDGER:
                    ledger.append(LedgerRecord(*row[1:]))
                elif kind == _ACCOUNT:
                    account = Account(*row[1:])
                else:
                    consent = _consent(row)
        if user_id is not None:
            yield UserState(user_id, account, tuple(ledger), consent)


def _consent(row: tuple[Any, ...]) -> UserConsent:
    _, user_id, terms_accepted, marketing_consent, timestamp, updated_at, version = row
    return UserConsent(
        user_id=user_id,
        terms_accepted=terms_accepted,
        marketing_consent=marketing_consent,
        timestamp=timestamp,
        updated_at=updated_at,
        terms_version=version,
    )


def _spooled_row(line: AccountLine | LedgerLine | ConsentLine) -> tuple[Any, ...]:
    """A validated line as the spool keeps it: its kind's number, then its values."""
    match line:
        case AccountLine():
            return (
                _ACCOUNT,
                line.user_id,
                line.is_guest,
                line.available_credits,
                line.max_credits,
                line.last_reset_timestamp,
            )
        case LedgerLine():
            return (
                _LEDGER,
                line.user_id,
                line.transaction_type,
                line.amount,
                line.timestamp,
                line.description,
                line.idempotency_key,
                line.id,
            )
        case ConsentLine():
            return (
                _CONSENT,
                line.user_id,
                line.terms_accepted,
                line.marketing_consent,
                line.timestamp,
                line.updated_at,
                line.terms_version,
            )


@asynccontextmanager
async def spooled(chunks: AsyncIterable[bytes]) -> AsyncIterator[Spooled]:
    """Validates a whole stream into a spool file, removed when the block ends;
    InvalidStreamError names the first line that is wrong (or the last, for a stream
    cut short)."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as file:
        footer = await _validated(_lines(chunks), file)
        yield Spooled(file, footer)


async def _lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    pending = b""
    number = 0
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        number += len(complete)
        for line in complete:
            yield line
        if len(pending) > MAX_LINE_BYTES:
            raise InvalidStreamError(number + 1, f"a line longer than {MAX_LINE_BYTES} bytes")
    if pending:
        yield pending


async def _validated(lines: AsyncIterator[bytes], spool: IO[bytes]) -> Footer:
    counts = {"account": 0, "ledger": 0, "consent": 0}
    number = 0
    footer: Footer | None = None
    rows: list[tuple[Any, ...]] = []
    async for raw in lines:
        number += 1
        if not raw.strip():
            raise InvalidStreamError(number, "an empty line")
        if footer is not None:
            raise InvalidStreamError(number, "a line after the footer")
        try:
            line = _LINE.validate_json(raw)
        except ValidationError as error:
            raise InvalidStreamError(number, _first_problem(error)) from None
        if number == 1 and not isinstance(line, Header):
            raise InvalidStreamError(number, "the first line is not a header")
        if number > 1 and isinstance(line, Header):
            raise InvalidStreamError(number, "a second header")
        if isinstance(line, Footer):
            footer = line
            found = {"accounts": counts["account"], "ledger_rows": counts["ledger"]}
            found["consents"] = counts["consent"]
            if line.model_dump(exclude={"kind"}) != found:
                raise InvalidStreamError(
                    number,
                    f"the footer counts {line.model_dump(exclude={'kind'})}, "
                    f"the stream holds {found}",
                )
        elif not isinstance(line, Header):
            counts[line.kind] += 1
            rows.append(_spooled_row(line))
            if len(rows) == SPOOL_CHUNK_LINES:
                pickle.dump(rows, spool, pickle.HIGHEST_PROTOCOL)
                rows = []
    if rows:
        pickle.dump(rows, spool, pickle.HIGHEST_PROTOCOL)
    if number == 0:
        raise InvalidStreamError(1, "an empty stream")
    if footer is None:
        raise InvalidStreamError(number, "the stream ends without its footer (truncated?)")
    return footer


def _first_problem(error: ValidationError) -> str:
    problem = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}" if where else str(problem["msg"])


async def merge_spooled(
    spooled: Spooled,
    target: StateRepository,
    *,
    progress: Callable[[int], None] | None = None,
) -> HandoverReport:
    """Merges a validated stream into `target`, verified user by user.

    Up to MERGES_IN_FLIGHT batches are merged at once, each its own transaction, while
    the next is read from the spool: the store's work and ours overlap. A batch naming a
    user that a batch in flight names waits for it, so that a user's runs are merged in
    stream order."""
    started = time.perf_counter()
    report = HandoverReport()
    batch: dict[str, UserState] = {}
    merging: list[tuple[asyncio.Task[None], list[UserState], set[str]]] = []
    done = 0

    async def settle() -> None:
        """Waits for the oldest batch in flight."""
        nonlocal done
        task, states, _ = merging.pop(0)
        await task
        done += _lines_of(states)
        if progress is not None:
            progress(done)

    async def flush() -> None:
        states = list(batch.values())
        named = set(batch)
        batch.clear()
        while merging and (
            len(merging) == MERGES_IN_FLIGHT
            or any(not named.isdisjoint(earlier) for _, _, earlier in merging)
        ):
            await settle()
        task = asyncio.create_task(copy_states(states, target, report))
        merging.append((task, states, named))

    try:
        for user in spooled.users():
            # A user whose lines come in several runs is merged a run at a time: one
            # merge never names a user twice.
            if user.user_id in batch or len(batch) == MERGE_BATCH_SIZE:
                await flush()
            batch[user.user_id] = user
        if batch:
            await flush()
        while merging:
            await settle()
    finally:
        for task, _, _ in merging:  # abandoned on an error: their transactions roll back
            task.cancel()
        for task, _, _ in merging:
            with contextlib.suppress(BaseException):
                await task
    report.seconds = time.perf_counter() - started
    return report


def _lines_of(states: list[UserState]) -> int:
    return sum(
        (state.account is not None) + len(state.ledger) + (state.consent is not None)
        for state in states
    )
