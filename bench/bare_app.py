"""The least a Python HTTP service can do for three of the project's routes: the limit
the `http` section measures the project against.

A bare Starlette app on an asyncpg pool (as asyncpg ships it; with BARE_POOL_RESET=false
its reset on release is skipped, for a second, stronger limit), served by
`python -m bench.bare_app` exactly as `python -m app` serves the project
(app/__main__.py: the same uvicorn, options and event loop). Each route reads what it
needs from the request, runs one prepared statement and writes the same JSON the
project answers with; nothing is validated, nothing else is done:

- POST /api/v1/credits/{user_id}/deduct: the atomic deduction, a conditional
  `UPDATE … RETURNING` and its ledger `INSERT` in one statement;
- GET /api/v1/credits/{user_id}: one indexed read of the account;
- POST /api/v1/assistant/query, a cache hit: one indexed read of the cached answer and
  the balance together.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.services.query_cache import cache_key

PERIOD = timedelta(hours=24)
ACCOUNT = "user_id, is_guest, available_credits, max_credits, last_reset_timestamp"
DEDUCT = f"""
WITH changed AS (
    UPDATE user_credits SET available_credits = available_credits - $2
     WHERE user_id = $1 AND available_credits >= $2
 RETURNING {ACCOUNT}
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp)
    SELECT user_id, 'deduction', -$2, now() FROM changed
)
SELECT {ACCOUNT} FROM changed"""
READ = f"SELECT {ACCOUNT} FROM user_credits WHERE user_id = $1"
CACHE_HIT = f"""
SELECT (SELECT result FROM query_cache WHERE query_hash = $1 AND expires_at > now()), {ACCOUNT}
  FROM user_credits WHERE user_id = $2"""


def _account(row: asyncpg.Record) -> dict[str, Any]:
    last_reset = row["last_reset_timestamp"]
    return {
        "user_id": row["user_id"],
        "is_guest": row["is_guest"],
        "available_credits": row["available_credits"],
        "max_credits": row["max_credits"],
        "last_reset_timestamp": last_reset.isoformat(),
        "next_reset_at": (last_reset + PERIOD).isoformat(),
    }


def _json(document: object, status: int = 200) -> Response:
    return Response(json.dumps(document), status, media_type="application/json")


async def deduct(request: Request) -> Response:
    amount = (await request.json()).get("amount", 1)
    async with request.app.state.pool.acquire() as conn:
        row = await conn.fetchrow(DEDUCT, request.path_params["user_id"], amount)
    return _json(_account(row)) if row else _json({"error": "insufficient_credits"}, 402)


async def read(request: Request) -> Response:
    async with request.app.state.pool.acquire() as conn:
        row = await conn.fetchrow(READ, request.path_params["user_id"])
    return _json(_account(row)) if row else _json({"error": "not_found"}, 404)


async def ask(request: Request) -> Response:
    body = await request.json()
    key = cache_key(body["query"], body.get("context") or None)
    async with request.app.state.pool.acquire() as conn:
        row = await conn.fetchrow(CACHE_HIT, key, body["user_id"])
    if row is None or row["result"] is None:
        return _json({"error": "not_cached"}, 404)
    return _json({**json.loads(row["result"]), "cached": True, "credits": _account(row)})


async def _kept(_: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is."""


async def ready(_: Request) -> Response:
    return _json({"status": "ready"})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    dsn = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://", 1)
    size = int(os.environ.get("BARE_POOL_SIZE", "8"))
    # BARE_POOL_RESET=false: no reset of a connection released to the pool, where asyncpg's
    # default costs a round trip per request; these statements leave no session state.
    reset = None if os.environ.get("BARE_POOL_RESET", "true") == "true" else _kept
    async with asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=reset) as pool:
        app.state.pool = pool
        yield


app = Starlette(
    routes=[
        Route("/api/v1/credits/{user_id}/deduct", deduct, methods=["POST"]),
        Route("/api/v1/credits/{user_id}", read, methods=["GET"]),
        Route("/api/v1/assistant/query", ask, methods=["POST"]),
        Route("/health/ready", ready),
    ],
    lifespan=lifespan,
)


if __name__ == "__main__":
    from app.__main__ import serve

    serve("bench.bare_app:app")
