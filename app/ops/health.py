"""Readiness: can the active store answer, and is the schema at head?"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import pool_status
from app.db.migrate import current_revision, head_revision

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
