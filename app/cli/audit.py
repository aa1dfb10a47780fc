"""`python -m app audit`: the ledger audit (app/ops/audit.py) of the database at
DATABASE_URL. The report goes to stdout as JSON; on a terminal, progress to stderr."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from pydantic import ValidationError

from app.cli.state import terminal_progress
from app.clock import utc_now
from app.config import Settings, settings_problems
from app.container import database_state, retried_guard
from app.db.engine import create_engine
from app.db.guarded import GuardedState
from app.db.readiness import database_status
from app.db.resilience import CircuitBreaker
from app.errors import StorageUnavailableError
from app.ops.audit import AuditReport, audit_ledger

CONSISTENT, DRIFTED, FAILED = 0, 1, 2
EXIT_STATUS = (
    f"exit status: {CONSISTENT} when no account drifted, {DRIFTED} when one did, "
    f"{FAILED} when the audit could not run (settings, database unreachable or not "
    "migrated, a failed read)"
)


async def run_audit(out: TextIO) -> int:
    """Audits the database; the exit status of EXIT_STATUS."""
    try:
        settings = Settings()
    except ValidationError as error:
        return _failed(f"invalid settings: {settings_problems(error)}")
    try:
        report = await _audit(settings)
    except StorageUnavailableError as error:
        return _failed(error.message)
    except Exception as error:  # the exit status says "failed", not "drifted" (1)
        first_line = str(error).strip().partition("\n")[0][:200]
        return _failed(f"{type(error).__name__}: {first_line}")
    print(json.dumps(report.body(), indent=2), file=out)
    return DRIFTED if report.drifted else CONSISTENT


async def _audit(settings: Settings) -> AuditReport:
    engine = create_engine(settings)
    try:
        status = await database_status(engine)
        if not status["up_to_date"]:
            raise StorageUnavailableError(
                f"the database is not ready (reachable: {status['reachable']}, revision: "
                f"{status['revision']}, head: {status['head']})"
            )
        breaker = CircuitBreaker(
            failure_threshold=settings.db_breaker_failure_threshold,
            reset_timeout=settings.db_breaker_reset_seconds,
        )
        state = GuardedState(
            database_state(settings, engine),
            retried_guard(breaker, settings),
        )
        progress = terminal_progress(unit="accounts")
        report = await audit_ledger(
            state,
            now=utc_now(),
            retention_days=settings.transaction_retention_days,
            batch_size=settings.audit_batch_size,
            progress=progress,
        )
        if progress is not None:
            progress(report.accounts, last=True)
        return report
    finally:
        await engine.dispose()


def _failed(reason: str) -> int:
    print(f"audit failed: {reason}", file=sys.stderr)
    return FAILED
