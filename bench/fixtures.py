"""Bulk data, loaded server-side with INSERT … SELECT generate_series (seconds, not minutes).

These rows are written straight into the tables, bypassing the services, so they
do not keep the ledger invariant (balance = opening + sum of the ledger); the
benchmark never checks it on them.
"""

from __future__ import annotations

import asyncpg

from bench.server import asyncpg_dsn

# A budget no run can exhaust (int4 holds 2^31 - 1): a deduction never fails for want of
# credits, so every variant does the same work on every call.
HUGE = 2_000_000_000
POOL_USERS = 10_000
POOL_PREFIX = "pool-"
HOT_USER = "hot-0000000"


def user_id(prefix: str, number: int) -> str:
    return f"{prefix}{number:07d}"


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(url))


async def load_users(conn: asyncpg.Connection, prefix: str, first: int, last: int) -> None:
    """Accounts prefix+0000000 … with a huge budget and a fresh reset (none due for 24 h)."""
    await conn.execute(
        """
        INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,
                                  last_reset_timestamp, created_at, updated_at)
        SELECT $1 || lpad(i::text, 7, '0'), true, $2, $2, now(), now(), now()
          FROM generate_series($3::int, $4::int - 1) AS i
        """,
        prefix,
        HUGE,
        first,
        last,
    )


async def load_ledger(
    conn: asyncpg.Connection, prefix: str, users: int, rows: int, *, age_days: tuple[int, int]
) -> None:
    """`rows` deductions spread evenly over `users` accounts, aged between the two bounds."""
    low, high = age_days
    await conn.execute(
        """
        INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp)
        SELECT $1 || lpad((i % $2)::text, 7, '0'), 'deduction', -1,
               now() - make_interval(days => $4) - (i::float8 / $3) * make_interval(days => $5)
          FROM generate_series(0, $3::int - 1) AS i
        """,
        prefix,
        users,
        rows,
        low,
        high - low,
    )


async def load_keys(conn: asyncpg.Connection, prefix: str, rows: int, *, age_days: int) -> bool:
    """Claimed idempotency keys: the service claims one per deduction, so retention deletes
    as many keys as ledger rows. False when the schema keeps no such table."""
    if await conn.fetchval("SELECT to_regclass('credit_idempotency_keys')") is None:
        return False
    await conn.execute(
        """
        INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at, operation)
        SELECT $1 || lpad((i % 10000)::text, 7, '0'), 'call:' || i,
               now() - make_interval(days => $3) - make_interval(secs => i), 'deduction'
          FROM generate_series(0, $2::int - 1) AS i
        """,
        prefix,
        rows,
        age_days,
    )
    return True


async def load_cache(conn: asyncpg.Connection, tag: str, rows: int, *, expired: bool) -> None:
    """Cache entries keyed like the real ones (64 hex chars), expired or live."""
    expires = "now() - interval '1 hour'" if expired else "now() + interval '1 hour'"
    await conn.execute(
        f"""
        INSERT INTO query_cache (query_hash, result, cached_at, expires_at)
        SELECT encode(sha256(convert_to($1 || i, 'UTF8')), 'hex'),
               '{{"answer": "bench", "products": [{{"id": 1, "name": "shoe"}}]}}'::jsonb,
               now() - interval '2 hours', {expires} - make_interval(secs => i % 3000)
          FROM generate_series(0, $2::int - 1) AS i
        """,
        tag,
        rows,
    )


async def vacuum_analyze(conn: asyncpg.Connection) -> None:
    """Fresh statistics and visibility map, as a database that has run for a while has."""
    for name in ("user_credits", "credit_transactions", "query_cache"):
        await conn.execute(f"VACUUM ANALYZE {name}")
    if await conn.fetchval("SELECT to_regclass('credit_idempotency_keys')") is not None:
        await conn.execute("VACUUM ANALYZE credit_idempotency_keys")
