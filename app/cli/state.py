"""`python -m app state export|import`: the state of the database at DATABASE_URL out to
stdout, or a file merged into it (SPEC §7), as the admin routes do. On a terminal,
progress goes to stderr; the import's verification report goes to stdout."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from typing import BinaryIO, TextIO

from app.config import Settings
from app.container import credit_rules, database_state
from app.db.engine import create_engine
from app.db.migrate import upgrade_schema
from app.db.readiness import database_status
from app.errors import StorageUnavailableError
from app.transfer.export import export_lines
from app.transfer.imports import staged
from app.transfer.lines import InvalidStreamError

READ_BYTES = 1024 * 1024


class Progress:
    """Rows (or other `unit`s) done, their rate and, with a total, the time left; at most
    twice a second."""

    def __init__(self, out: TextIO, total: int | None = None, unit: str = "rows") -> None:
        self._out = out
        self._total = total
        self._unit = unit
        self._started = time.monotonic()
        self._shown = 0.0

    def __call__(self, done: int, *, last: bool = False) -> None:
        now = time.monotonic()
        if not last and now - self._shown < 0.5:
            return
        self._shown = now
        rate = done / max(now - self._started, 1e-9)
        unit = self._unit
        line = f"{done:,} {unit}, {rate:,.0f} {unit}/s"
        if self._total:
            left = (self._total - done) / rate if rate else 0
            line = f"{done:,}/{self._total:,} {unit}, {rate:,.0f} {unit}/s, {left:,.0f} s left"
        self._out.write(f"\r{line}" + ("\n" if last else ""))
        self._out.flush()


def terminal_progress(total: int | None = None, unit: str = "rows") -> Progress | None:
    """Progress on stderr when it is a terminal; None (silence) otherwise."""
    return Progress(sys.stderr, total, unit) if sys.stderr.isatty() else None


async def export_state(out: BinaryIO) -> int:
    settings = Settings()
    engine = create_engine(settings)
    try:
        status = await database_status(engine)
        if not status["up_to_date"]:
            print(f"cannot export: the database is not ready: {status}", file=sys.stderr)
            return 1
        progress = terminal_progress()
        rows = 0
        state = database_state(settings, engine)
        lines = export_lines(state, credit_rules(settings), "database")
        async for chunk in lines:
            out.write(chunk)
            rows += chunk.count(b"\n")
            if progress is not None:
                progress(rows)
        out.flush()
        if progress is not None:
            progress(rows, last=True)
        return 0
    finally:
        await engine.dispose()


async def import_state(path: str) -> int:
    try:
        # A local file or a pipe: plain blocking reads, the CLI has nothing else to do.
        source = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: ASYNC230, SIM115
    except OSError as error:
        print(f"import failed: cannot read {path}: {error.strerror}", file=sys.stderr)
        return 1
    with source:
        return await _import(source)


async def _import(source: BinaryIO) -> int:
    settings = Settings()
    engine = create_engine(settings)
    try:
        if settings.run_migrations_on_startup:
            await upgrade_schema(settings, engine)
        state = database_state(settings, engine)
        async with staged(_chunks(source), state) as stream:
            progress = terminal_progress(stream.lines)
            report = await stream.merge(progress=progress)
            if progress is not None:
                progress(stream.lines, last=True)
    except InvalidStreamError as error:
        print(f"import refused: {error.message}", file=sys.stderr)
        return 2
    except StorageUnavailableError as error:
        print(f"import failed: {error.message}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    print(json.dumps(report.body(), indent=2))
    return 0 if report.verification.mismatches == 0 else 1


async def _chunks(source: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := source.read(READ_BYTES):
        yield chunk
