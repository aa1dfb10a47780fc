"""Section `handover`: moving state into PostgreSQL and out of it (SPEC §7).

- Import: N accounts and 2N ledger rows as an NDJSON stream, validated into a spool and
  merged (app/transfer/imports.py) into an empty database through
  PostgresStateRepository, against asyncpg's binary COPY of the same rows into the same
  tables of another empty database: the least any import can cost. SqlStateRepository
  is measured on a tenth of the stream.
- Export: those N accounts streamed to /dev/null by export_lines, in a process of its own
  (bench/export_rss.py), which reports the peak resident memory the export added.
- Hand-over: memory accounts carried to PostgreSQL by hand_over() while writers keep
  passing the write gate; the longest a write waited at the gate is what users feel.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO

from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import utc_now
from app.config import StorageBackend
from app.container import credit_rules
from app.db.engine import create_engine
from app.domain.credits import Account, Attempt, CreditRules, Deduct
from app.domain.state import LedgerRecord
from app.repositories.base import StateRepository
from app.repositories.database import sql_stores
from app.repositories.memory import MemoryData, MemoryStateRepository, memory_stores
from app.repositories.postgres.state import PostgresStateRepository
from app.repositories.sql.state import SqlStateRepository
from app.switching.handover import hand_over
from app.switching.provider import StorageProvider
from app.switching.routing import WriteGate
from app.transfer.imports import staged
from bench import fixtures
from bench.context import Context
from bench.report import heading, rate, ratio, say, table
from bench.server import bench_settings

BASE = datetime(2026, 11, 1, tzinfo=UTC)
READ_BYTES = 1024 * 1024
WRITERS = 4
WRITE_PAUSE = 0.001  # seconds between one writer's writes
RETENTION = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class _User:
    user_id: str
    at: datetime
    key: str

    @property
    def later(self) -> datetime:
        return self.at + timedelta(milliseconds=1)


def _users(count: int) -> Iterator[_User]:
    for number in range(count):
        yield _User(
            fixtures.user_id("imp-", number), BASE + timedelta(seconds=number), f"k-{number}"
        )


def _line(line: dict[str, object]) -> bytes:
    return json.dumps(line, default=datetime.isoformat, separators=(",", ":")).encode() + b"\n"


def _write_stream(out: IO[bytes], count: int) -> None:
    """What an export of `count` such users looks like: an account, a keyed deduction
    and a described one each."""
    out.write(_line({"kind": "header", "format": 1, "store": "bench", "exported_at": BASE}))
    for number, user in enumerate(_users(count)):
        account = {"kind": "account", "user_id": user.user_id, "is_guest": True}
        account.update(available_credits=7, max_credits=10, last_reset_timestamp=user.at)
        out.write(_line({**account, "next_reset_at": None}))
        ledger = {"kind": "ledger", "user_id": user.user_id, "transaction_type": "deduction"}
        out.write(
            _line(
                {**ledger, "id": 2 * number + 1, "amount": -2, "timestamp": user.at}
                | {"description": None, "idempotency_key": user.key}
            )
        )
        out.write(
            _line(
                {**ledger, "id": 2 * number + 2, "amount": -1, "timestamp": user.later}
                | {"description": "bench", "idempotency_key": None}
            )
        )
    out.write(_line({"kind": "footer", "accounts": count, "ledger_rows": 2 * count, "consents": 0}))
    out.flush()


async def _chunks(source: IO[bytes]) -> AsyncIterator[bytes]:
    source.seek(0)
    while chunk := source.read(READ_BYTES):
        yield chunk


@dataclass
class _Import:
    rows: int
    seconds: float
    validated_seconds: float = 0.0
    mismatches: int = 0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


async def _raw_copy(url: str, count: int) -> _Import:
    """The same rows by asyncpg's COPY, records made before the clock starts."""
    users = list(_users(count))
    accounts = [(u.user_id, True, 7, 10, u.at, u.at, u.at) for u in users]
    rows: list[tuple[object, ...]] = [
        (u.user_id, "deduction", -2, u.at, None, u.key) for u in users
    ]
    rows += [(u.user_id, "deduction", -1, u.later, "bench", None) for u in users]
    keys = [(u.user_id, u.key, u.at, "deduction") for u in users]
    conn = await fixtures.connect(url)
    try:
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "user_credits",
            records=accounts,
            columns=[
                "user_id",
                "is_guest",
                "available_credits",
                "max_credits",
                "last_reset_timestamp",
                "created_at",
                "updated_at",
            ],
        )
        await conn.copy_records_to_table(
            "credit_transactions",
            records=rows,
            columns=[
                "user_id",
                "transaction_type",
                "amount",
                "timestamp",
                "description",
                "idempotency_key",
            ],
        )
        await conn.copy_records_to_table(
            "credit_idempotency_keys",
            records=keys,
            columns=["user_id", "idempotency_key", "created_at", "operation"],
        )
        return _Import(len(accounts) + len(rows), time.perf_counter() - started)
    finally:
        await conn.close()


def _postgres_state(engine: AsyncEngine, rules: CreditRules) -> StateRepository:
    return PostgresStateRepository(engine, rules, retention=RETENTION)


def _sql_state(engine: AsyncEngine, rules: CreditRules) -> StateRepository:
    return SqlStateRepository(engine, rules, retention=RETENTION)


async def _project_import(
    url: str, stream: IO[bytes], target: Callable[[AsyncEngine, CreditRules], StateRepository]
) -> _Import:
    settings = bench_settings(url, pool=2)
    engine = create_engine(settings)
    try:
        started = time.perf_counter()
        async with staged(_chunks(stream), target(engine, credit_rules(settings))) as validated:
            validated_at = time.perf_counter()
            report = await validated.merge()
        body = report.body()
        return _Import(
            body["accounts"] + body["ledger_rows"],
            time.perf_counter() - started,
            validated_at - started,
            body["mismatches"],
        )
    finally:
        await engine.dispose()


async def _imports(ctx: Context, count: int) -> tuple[str, _Import, _Import, _Import, int]:
    """The imported database's URL, the baseline, the import, and SqlStateRepository's
    import of a smaller stream (of `small` accounts)."""
    small = max(count // 10, 1000)
    with tempfile.TemporaryFile() as stream, tempfile.TemporaryFile() as small_stream:
        started = time.monotonic()
        _write_stream(stream, count)
        _write_stream(small_stream, small)
        say(f"  .. streams written in {time.monotonic() - started:.0f} s")
        raw = await _raw_copy(await ctx.databases.create("handover_raw"), count)
        say(f"  .. raw COPY done in {raw.seconds:.1f} s")
        url = await ctx.databases.create("handover")
        project = await _project_import(url, stream, _postgres_state)
        say(f"  .. import done in {project.seconds:.1f} s")
        general = await _project_import(
            await ctx.databases.create("handover_sql"), small_stream, _sql_state
        )
    return url, raw, project, general, small


def _export(url: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.export_rss", url],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


@dataclass
class _Writes:
    """What the writers saw at the gate."""

    made: int = 0
    longest_wait: float = 0.0
    waits_over_10ms: int = 0
    errors: list[str] = field(default_factory=list)


async def _writer(
    provider: StorageProvider, gate: WriteGate, users: int, stop: asyncio.Event, seen: _Writes
) -> None:
    """Passes the gate as RoutedCredits does, timing the wait, then deducts a credit
    from a random user of whichever store is primary by then."""
    rng = random.Random()
    while not stop.is_set():
        user_id = fixtures.user_id("mem-", rng.randrange(users))
        asked = time.perf_counter()
        await gate.enter(user_id)
        waited = time.perf_counter() - asked
        try:
            await provider.stores.credits.apply(user_id, Deduct(1), Attempt(utc_now()))
            seen.made += 1
        except Exception as error:  # counted; a refused deduction is no failure of the gate
            seen.errors.append(type(error).__name__)
        finally:
            gate.leave(user_id)
        seen.longest_wait = max(seen.longest_wait, waited)
        seen.waits_over_10ms += waited > 0.01
        await asyncio.sleep(WRITE_PAUSE)


def _memory_data(users: int) -> MemoryData:
    """Accounts with one or two keyed ledger rows each, none due for a reset."""
    data = MemoryData(max_users=2 * users)
    now = utc_now()
    for number in range(users):
        user_id = fixtures.user_id("mem-", number)
        rows = 1 + number % 2
        data.accounts[user_id] = Account(user_id, True, 10 - rows, 10, now)
        data.held.add(user_id)
        for row in range(rows):
            key = f"{user_id}-{row}"
            record = LedgerRecord(user_id, "deduction", -1, now, None, key, next(data.ids))
            data.ledger[user_id].append(record)
            claim = record.claim()
            assert claim is not None
            data.keys[user_id][key] = (now, claim)
    return data


async def _hand_over(url: str, users: int) -> tuple[dict[str, object], _Writes, float]:
    settings = bench_settings(url, pool=4)
    rules = credit_rules(settings)
    engine = create_engine(settings)
    data = _memory_data(users)
    provider = StorageProvider(
        backend=StorageBackend.MEMORY,
        cache_backend=None,
        memory=memory_stores(rules, data),
        database=sql_stores(engine, rules, fast=None),
        caches={},
    )
    gate = WriteGate()
    seen = _Writes()
    stop = asyncio.Event()
    writers = [
        asyncio.create_task(_writer(provider, gate, users, stop, seen)) for _ in range(WRITERS)
    ]
    try:
        started = time.perf_counter()
        report = await hand_over(
            MemoryStateRepository(data, rules, retention=RETENTION),
            _postgres_state(engine, rules),
            gate,
            lambda: provider.switch(StorageBackend.DATABASE),
        )
        seconds = time.perf_counter() - started
        await asyncio.sleep(0.5)  # writes go on, to the new primary now
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await engine.dispose()
    return report.body(), seen, seconds


async def run(ctx: Context) -> None:
    count = 10_000 if ctx.quick else 1_000_000
    carried = 10_000 if ctx.quick else 100_000
    heading(f"handover: import and export of {count:,} accounts, hand-over of {carried:,}")
    if ctx.quick:
        say("  --quick: 10k accounts each (the full run: 1M imported, 100k handed over)")
    url, raw, project, general, small = await _imports(ctx, count)
    exported = _export(url)
    say(f"  .. export done in {exported['seconds']:.1f} s")
    report, writes, seconds = await _hand_over(await ctx.databases.create("handover_gate"), carried)
    rows = [
        [
            "raw asyncpg COPY (baseline)",
            f"{raw.rows:,}",
            f"{raw.seconds:.1f}",
            rate(raw.rate),
            "1.00x",
        ],
        [
            "import, PostgresStateRepository",
            f"{project.rows:,}",
            f"{project.seconds:.1f}",
            rate(project.rate),
            ratio(project.rate, raw.rate),
        ],
        [
            "  of which validation and spooling",
            "",
            f"{project.validated_seconds:.1f}",
            rate(project.rows / project.validated_seconds),
            "",
        ],
        [
            f"import, SqlStateRepository ({small:,} accounts)",
            f"{general.rows:,}",
            f"{general.seconds:.1f}",
            rate(general.rate),
            ratio(general.rate, raw.rate),
        ],
    ]
    table(["import (accounts + ledger rows)", "rows", "s", "rows/s", "ratio"], rows)
    if project.mismatches or general.mismatches:
        say(f"  WARNING: mismatches after import: {project.mismatches}, {general.mismatches}")
    quick = " (--quick)" if ctx.quick else ""
    ctx.targets.check(
        "import >= 0.5x raw COPY",
        f"{rate(project.rate)} vs {rate(raw.rate)} rows/s = {ratio(project.rate, raw.rate)}"
        + quick,
        project.rate >= 0.5 * raw.rate and not project.mismatches,
    )
    say(
        f"  export: {exported['lines']:,.0f} lines in {exported['seconds']:.1f} s "
        f"({rate(exported['lines'] / exported['seconds'])} lines/s), RSS before "
        f"{exported['rss_before_mib']:.0f} MiB, peak growth {exported['peak_growth_mib']:.1f} MiB"
    )
    ctx.targets.check(
        "export peak RSS growth < 100 MB",
        f"{exported['peak_growth_mib']:.1f} MiB over {count:,} accounts" + quick,
        exported["peak_growth_mib"] * 1024 * 1024 < 100_000_000,
    )
    say(
        f"  hand-over: {report['accounts']:,} accounts, {report['ledger_rows']:,} ledger rows in "
        f"{seconds:.1f} s, {report['mismatches']} mismatches; writes held "
        f"{report['writes_held_seconds']} s (the held step); {writes.made:,} writes by "
        f"{WRITERS} writers, {writes.waits_over_10ms} waited over 10 ms, longest "
        f"{writes.longest_wait * 1000:.1f} ms; write errors: {len(writes.errors)}"
    )
    ctx.targets.check(
        "writes held <= 2 s during a hand-over",
        f"longest wait at the gate {writes.longest_wait:.3f} s, {carried:,} accounts" + quick,
        writes.longest_wait <= 2.0 and report["mismatches"] == 0,
    )
