"""The outage journal: each change the fallback serves, on disk before it is acknowledged
(SPEC §9).

An SQLite file in WAL mode with `synchronous=FULL`: an append returns once its commit
has reached the disk. Appends made while a commit runs wait for the next one and share
its sync (group commit). SQLite checksums every WAL frame, so a record torn by a power
loss mid-write is dropped when the file is next opened and the intact records before it
are kept. Replay marks records done on a second connection with `synchronous=NORMAL`:
that survives the process being killed; a power loss may bring a change back once
more, and the replay finds it applied (by its idempotency key, or for a consent change
or a reset by the instant it shows: app/outage/fallback.py).

Each process holds its journal exclusively (a lock file beside it). A second process
given the same path takes the next free slot (`outage-journal.1.db`, ...), so worker
processes of one server each get their own; a restarted process takes the first free
slot and replays what an earlier process left in it.

A record is a JSON object read and written by msgspec, as a state stream's lines are
(app/transfer/stream.py), each kind a Struct tagged by `kind`. Records written before
that, by the json module, read as the same changes: the same fields, and instants by
`isoformat()`, which RFC 3339 reads alike.

The standard library's sqlite3 on one thread of its own: the file is local and the
statements are tiny, and aiosqlite would run each connection on a thread anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union, assert_never, get_args, get_type_hints

import msgspec

from app.domain.credits import Attempt, Change

R = TypeVar("R")
MAX_SLOTS = 64
_REASON_LENGTH = 2_000


class _Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    """A journal record: a JSON object whose `kind` names the change it holds."""


@dataclass(frozen=True)
class CreditChange:
    user_id: str
    change: Change
    attempt: Attempt


class ConsentRecorded(_Record, frozen=True, tag="consent"):
    user_id: str
    terms_accepted: bool
    marketing_consent: bool
    terms_version: str | None
    now: datetime


class MarketingChanged(_Record, frozen=True, tag="marketing"):
    """A change of the marketing choice alone; `terms_accepted` and `terms_version`: the
    consent it changed, as the fallback knew it, for the history event it was
    acknowledged with (None in records journaled before they were kept)."""

    user_id: str
    marketing_consent: bool
    now: datetime
    terms_accepted: bool | None = None
    terms_version: str | None = None


Served = CreditChange | ConsentRecorded | MarketingChanged


def _change_record(kind: type[Change]) -> type[msgspec.Struct]:
    """The record of a change: its dataclass's fields, tagged `type` with its class name."""
    hints = get_type_hints(kind)
    fields = [
        (field.name, hints[field.name])
        if field.default is dataclasses.MISSING
        else (field.name, hints[field.name], field.default)
        for field in dataclasses.fields(kind)
    ]
    return msgspec.defstruct(
        kind.__name__,
        fields,
        module=__name__,
        frozen=True,
        forbid_unknown_fields=True,
        tag_field="type",
        tag=True,
    )


# Made from the Change union: a new operation is journaled with nothing added here.
_CHANGE_RECORDS: dict[type[Change], type[msgspec.Struct]] = {
    kind: _change_record(kind) for kind in get_args(Change)
}
_CHANGES = {record: kind for kind, record in _CHANGE_RECORDS.items()}
if TYPE_CHECKING:
    _ChangeRecord = msgspec.Struct
else:  # what msgspec decodes, by `type`; mypy cannot follow a union made at run time
    _ChangeRecord = Union[tuple(_CHANGE_RECORDS.values())]  # noqa: UP007 (`|` spreads no tuple)


class _CreditRecord(_Record, frozen=True, tag="credit"):
    """A credit change as journaled: its attempt's fields beside the change."""

    user_id: str
    change: _ChangeRecord
    at: datetime
    key: str | None
    own_key: bool


_ENCODER = msgspec.json.Encoder()
_Readable = _CreditRecord | ConsentRecorded | MarketingChanged
_DECODER: msgspec.json.Decoder[_Readable] = msgspec.json.Decoder(_Readable)


class JournalError(RuntimeError):
    """The journal cannot be opened or written; `str()` says why."""


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    change: dict[str, Any]  # the record as journaled (JSON), or {"unreadable": text}
    reason: str
    at: datetime


def encode(served: Served) -> str:
    """The journal's text of a change: JSON, instants in RFC 3339."""
    record: _Record
    match served:
        case CreditChange(user_id, change, attempt):
            fields = _CHANGE_RECORDS[type(change)](**dataclasses.asdict(change))
            record = _CreditRecord(user_id, fields, attempt.at, attempt.key, attempt.own_key)
        case ConsentRecorded() | MarketingChanged():
            record = served
        case _:
            assert_never(served)
    return _ENCODER.encode(record).decode()  # text: sqlite3 would keep bytes as a BLOB


def decode(text: str) -> Served:
    """The change a record holds; msgspec.DecodeError (a ValueError) when it holds none.
    A credit change comes back as possibly applied (`sent`): the process that wrote it
    may have replayed it before it died, and the store then looks its key up."""
    record = _DECODER.decode(text)
    match record:
        case _CreditRecord(user_id, fields, at, key, own_key):
            change = _CHANGES[type(fields)](**msgspec.structs.asdict(fields))
            return CreditChange(user_id, change, Attempt(at, key, own_key=own_key, sent=True))
        case _:
            return record


class OutageJournal:
    """Changes in the order they were acknowledged, until replayed or moved aside as
    dead letters. `depth`: changes waiting, counting appends whose sync is under way."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outage-journal")
        try:
            self._appends, self._marks = self._on_thread(self._connect)
            self.depth, self.dead_letters = self._on_thread(self._counts)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._release()
            raise
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, *, exact: bool = False) -> OutageJournal:
        """The journal at `path`, or (unless `exact`) at the first free slot beside it.
        JournalError if it is held by another process or cannot be opened."""
        wanted = Path(path)
        slots = [wanted] if exact else [_slot(wanted, n) for n in range(MAX_SLOTS)]
        for candidate in slots:
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                lock_fd = os.open(f"{candidate}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as error:
                raise JournalError(f"outage journal {candidate}: {error}") from error
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                continue
            try:
                return cls(candidate, lock_fd)
            except sqlite3.Error as error:
                raise JournalError(f"outage journal {candidate}: {error}") from error
        held = "held by another process" if exact else f"all {MAX_SLOTS} slots held"
        raise JournalError(f"outage journal {wanted}: {held}")

    def append(self, served: Served) -> asyncio.Future[None]:
        """Queue `served` at the end; the future is done once it is on disk (JournalError
        if it could not be written). Queued in call order, without awaiting: changes a
        caller made in one order are journaled in that order."""
        if self._closed:
            raise JournalError(f"outage journal {self.path}: closed")
        loop = asyncio.get_running_loop()
        synced: asyncio.Future[None] = loop.create_future()
        self._waiting.append((encode(served), synced))
        self.depth += 1
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush())
        return synced

    async def head(self, after: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` records after sequence number `after`, oldest first."""
        return await self._run(self._head, after, limit)

    async def done(self, seqs: Sequence[int]) -> None:
        """The records were applied: drop them."""
        if seqs:
            await self._run(self._done, list(seqs))
            self.depth -= len(seqs)

    async def dead(self, seq: int, reason: str) -> None:
        """The database refuses the record for good: keep it aside, with why."""
        await self._run(self._dead, seq, reason[:_REASON_LENGTH], datetime.now(UTC).isoformat())
        self.depth -= 1
        self.dead_letters += 1

    async def letters(self, limit: int) -> list[DeadLetter]:
        """The dead letters, oldest first."""
        rows = await self._run(self._letters, limit)
        return [
            DeadLetter(seq, _readable(body), reason, datetime.fromisoformat(at))
            for seq, body, reason, at in rows
        ]

    async def forget(self, seq: int) -> bool:
        """Drop a dead letter an operator has dealt with; False if there is none."""
        dropped: bool = await self._run(self._forget, seq)
        self.dead_letters -= int(dropped)
        return dropped

    async def close(self) -> None:
        """Waits for the appends under way; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
        await self._run(self._close)
        self._thread.shutdown()
        self._release()

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await self._run(self._insert, [text for text, _ in batch])
                except BaseException as error:  # whatever it was, no waiter is left hanging
                    self.depth -= len(batch)
                    failed = JournalError(f"outage journal {self.path}: {error}")
                    for _, synced in batch:
                        if not synced.done():
                            synced.set_exception(failed)
                    if not isinstance(error, sqlite3.Error | OSError):
                        raise
                    continue
                for _, synced in batch:
                    if not synced.done():  # its waiter may have been cancelled
                        synced.set_result(None)
        finally:
            self._flushing = None

    async def _run(self, call: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    def _on_thread(self, call: Callable[[], R]) -> R:
        return self._thread.submit(call).result()

    def _release(self) -> None:
        os.close(self._lock_fd)

    # What follows runs on the journal's thread only.

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        appends = sqlite3.connect(self.path, isolation_level=None)
        appends.execute("PRAGMA journal_mode=WAL")
        appends.execute("PRAGMA synchronous=FULL")
        appends.executescript(
            """
            CREATE TABLE IF NOT EXISTS changes (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS dead_letters (
                seq INTEGER PRIMARY KEY, body TEXT NOT NULL, reason TEXT NOT NULL,
                at TEXT NOT NULL);
            """
        )
        marks = sqlite3.connect(self.path, isolation_level=None)
        marks.execute("PRAGMA synchronous=NORMAL")
        return appends, marks

    def _counts(self) -> tuple[int, int]:
        (depth,) = self._marks.execute("SELECT count(*) FROM changes").fetchone()
        (dead,) = self._marks.execute("SELECT count(*) FROM dead_letters").fetchone()
        return depth, dead

    def _insert(self, texts: list[str]) -> None:
        with self._appends:
            self._appends.execute("BEGIN IMMEDIATE")
            self._appends.executemany(
                "INSERT INTO changes (body) VALUES (?)", [(t,) for t in texts]
            )

    def _head(self, after: int, limit: int) -> list[tuple[int, str]]:
        rows: list[tuple[int, str]] = self._marks.execute(
            "SELECT seq, body FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return rows

    def _done(self, seqs: list[int]) -> None:
        with self._marks:
            self._marks.execute("BEGIN IMMEDIATE")
            self._marks.executemany("DELETE FROM changes WHERE seq = ?", [(seq,) for seq in seqs])

    def _dead(self, seq: int, reason: str, at: str) -> None:
        with self._marks:
            self._marks.execute("BEGIN IMMEDIATE")
            self._marks.execute(
                "INSERT INTO dead_letters (seq, body, reason, at) "
                "SELECT seq, body, ?, ? FROM changes WHERE seq = ?",
                (reason, at, seq),
            )
            self._marks.execute("DELETE FROM changes WHERE seq = ?", (seq,))

    def _letters(self, limit: int) -> list[tuple[int, str, str, str]]:
        rows: list[tuple[int, str, str, str]] = self._marks.execute(
            "SELECT seq, body, reason, at FROM dead_letters ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return rows

    def _forget(self, seq: int) -> bool:
        deleted = self._marks.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,))
        return deleted.rowcount > 0

    def _close(self) -> None:
        self._marks.close()
        self._appends.close()


def _slot(path: Path, n: int) -> Path:
    return path if n == 0 else path.with_name(f"{path.stem}.{n}{path.suffix}")


def _readable(body: str) -> dict[str, Any]:
    try:
        record = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return {"unreadable": body}
    return record if isinstance(record, dict) else {"unreadable": body}
