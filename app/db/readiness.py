"""Readiness: can the database answer, is its schema at head, and what start-up says
when it is not ready (migrations run first, when enabled)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db.engine import pool_status
from app.db.migrate import current_revision, head_revision, upgrade_schema
from app.db.refusal import connection_refusal
from app.db.resilience import is_unavailable
from app.errors import StorageUnavailableError
from app.tls import tls_failure

logger = logging.getLogger(__name__)

READINESS_TIMEOUT_SECONDS = 3.0


async def database_status(engine: AsyncEngine) -> dict[str, Any]:
    """Reachability, Alembic revision against head, and pool figures; never raises."""
    status: dict[str, Any] = {
        "dialect": engine.dialect.name,
        "reachable": False,
        "revision": None,
        "head": head_revision(),
        "pool": pool_status(engine),
    }
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            # Reading the revision is the reachability probe too: one connection, not two.
            status["revision"] = await current_revision(engine)
        status["reachable"] = True
    except Exception as error:  # any failure means "not ready", reported, not raised
        status["error"] = type(error).__name__
    status["up_to_date"] = status["reachable"] and status["revision"] == status["head"]
    return status


async def prepare_database(settings: Settings, engine: AsyncEngine) -> None:
    """Migrate (when enabled) and check that the schema is at head;
    StorageUnavailableError saying why not."""
    migrate = settings.run_migrations_on_startup
    try:
        if migrate:
            await upgrade_schema(settings, engine)
        else:
            await current_revision(engine)  # reached, or the failure says why not
    except Exception as error:
        failed = "database migrations failed" if migrate else "reading the schema failed"
        raise _not_prepared(error, failed) from error
    status = await database_status(engine)
    if not status["up_to_date"]:
        raise StorageUnavailableError(
            f"database not ready: reachable={status['reachable']}, "
            f"revision={status['revision']}, head={status['head']}"
            + (f", error={status['error']}" if "error" in status else "")
        )


def _not_prepared(error: Exception, failed: str) -> StorageUnavailableError:
    """What start-up reports: a TLS failure as one (app/tls.py); a refusal as one
    (app/db/refusal.py), the server's words logged; an unreachable database as such;
    anything else as `failed`."""
    if (tls := tls_failure(error)) is not None:
        return StorageUnavailableError(tls)
    refusal = connection_refusal(error)
    if refusal is not None:
        logger.error("%s: %s", refusal.summary, refusal.said)
        return StorageUnavailableError(refusal.summary)
    if is_unavailable(error):
        return StorageUnavailableError("the database is unreachable")
    logger.error(failed, exc_info=error)
    return StorageUnavailableError(failed)
